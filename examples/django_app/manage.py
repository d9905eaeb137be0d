"""Django's command line for the example project; from the repository root, either of

    python examples/django_app/manage.py runserver      # or check, ...
    python -m examples.django_app.manage runserver

(also from this directory: ``python manage.py runserver``).
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a file, Python puts this directory first on the path, not the repository root that the
    # settings' dotted names (examples.django_app...) start from: put the root there too.
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
