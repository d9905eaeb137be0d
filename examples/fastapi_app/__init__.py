"""A FastAPI service that calls OpenAI through one AsyncThrottledClient per worker: see ``main.py``."""
