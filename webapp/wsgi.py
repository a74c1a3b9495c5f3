"""The WSGI entry point gunicorn loads (see gunicorn.conf.py)."""

from webapp import create_app

app = create_app()
