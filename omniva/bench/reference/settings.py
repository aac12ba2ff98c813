"""Settings of the reference app: Omniva's DATABASES with persistent connections, nothing else.

The database is the one Omniva's settings name (DATABASE_URL, which `bench web` sets
to the suite's database), kept open between requests (CONN_MAX_AGE), as the usual
gunicorn deployment of Django does. A connection pool in Omniva's OPTIONS is dropped:
Django refuses a pool together with persistent connections, and the reference is the
persistent-connection setup. Everything else that could run per request is off: no
apps, no middleware, no authentication, no throttling.
"""

from __future__ import annotations

from typing import Any

from omniva import settings as omniva_settings

PERSISTENT_CONN_MAX_AGE = 600


def _database() -> dict[str, Any]:
    database = dict(omniva_settings.DATABASES["default"])
    options = {k: v for k, v in database.get("OPTIONS", {}).items() if k != "pool"}
    return {**database, "OPTIONS": options, "CONN_MAX_AGE": PERSISTENT_CONN_MAX_AGE}


DEBUG = False
SECRET_KEY = omniva_settings.SECRET_KEY  # signs nothing here: no sessions, CSRF or messages
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "omniva.bench.reference.urls"
WSGI_APPLICATION = "omniva.bench.reference.wsgi.application"
DATABASES = {"default": _database()}
USE_TZ = True
REST_FRAMEWORK = {
    # Without django.contrib.auth installed, an unauthenticated request's user is None.
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_THROTTLE_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
