"""The examples, importable from the repository root (``examples.flask_app``, ``examples.django_app``).

A regular package rather than a namespace one, so that no other ``examples`` package installed in the
environment can take its place.
"""
