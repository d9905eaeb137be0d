"""A minimal Django project whose views call OpenAI through one ThrottledClient per process.

From the repository root (``pip install -e .`` and Django first; gunicorn for production):

    export OPENAI_API_KEY=sk-...  REDIS_URL=redis://127.0.0.1:6379/0  OPENAI_RPM=500  OPENAI_TPM=200000
    gunicorn -w 4 --threads 8 -b 127.0.0.1:8000 examples.django_app.wsgi
    python examples/django_app/manage.py runserver        # development server (or check, ...)
    python -m examples.django_app.manage runserver        # the same
    curl -X POST localhost:8000/chat -H 'Content-Type: application/json' -d '{"message": "Hi"}'

``GET /healthz`` answers without calling OpenAI.

The same settings and behaviour as ``examples/flask_app.py``: ``settings.THROTTLED_OPENAI`` is read from
the same environment variables; with ``REDIS_URL`` all workers share one budget in Redis; a short
``MAX_WAIT`` makes a saturated limit answer 503 with ``Retry-After`` at once (``throttling.py``'s
middleware) instead of holding a worker thread.
"""
