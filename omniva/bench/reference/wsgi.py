"""The reference's WSGI application (`gunicorn omniva.bench.reference.wsgi:application`)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omniva.bench.reference.settings")
application = get_wsgi_application()
