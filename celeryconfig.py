"""Celery settings for the Tidings worker (`celery -A tasks worker`).

Every value that differs from Celery's default says why: the listener is a
task that never ends, which breaks several of Celery's assumptions.
"""

from tidings.connection import client_name
from tidings.settings import load_or_exit

_settings = load_or_exit()

# The broker lives on the same Redis as the data, one database up by default
# (TIDINGS_BROKER_URL). Results of the demo task go there too.
broker_url = _settings.broker_url
result_backend = _settings.broker_url
result_expires = 3600

# A Redis outage of any length must not stop the worker: retry forever
# (Celery's default gives up after 100 retries and exits).
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# The listener gets a queue of its own so it never waits behind application
# tasks, and application tasks keep the default queue. Webhook delivery has
# its own too: short tasks (a few seconds at most) that neither wait behind
# the listener nor make application tasks wait long.
task_queues = {
    "celery": {"routing_key": "celery"},
    "tidings.listener": {"routing_key": "tidings.listener"},
    "tidings.webhooks": {"routing_key": "tidings.webhooks"},
}
task_default_queue = "celery"
task_routes = {
    "tidings.listener": {"queue": "tidings.listener"},
    "tidings.webhooks.deliver": {"queue": "tidings.webhooks"},
}

# Prefetch one message per process: a worker busy with the listener must not
# sit on queued tasks that an idle worker could run.
worker_prefetch_multiplier = 1

# Early acknowledgement (Celery's default, stated because it matters): the
# listener message is acked when the task starts. With acks_late the Redis
# transport would redeliver the never-ending task to another worker after
# visibility_timeout, a duplicate listener. The lease makes a duplicate
# harmless anyway; this keeps it from happening at all.
task_acks_late = False
# Unacked (prefetched, not yet started) messages are redelivered after this
# long; one hour is far above any wait for a free process.
# client_name: CLIENT LIST shows Celery's own connections as
# tidings:celery:<host>:<worker pid> beside the listener's and the web's.
broker_transport_options = {"visibility_timeout": 3600, "client_name": client_name("celery")}
redis_client_name = client_name("celery")
# Redis Sentinel (TIDINGS_BROKER_URL=sentinel://host1:port1;sentinel://host2:port2):
# kombu and the result backend find the master by name (TIDINGS_SENTINEL_MASTER,
# else the service of a redis+sentinel:// TIDINGS_REDIS_URL) and follow failovers.
if broker_url.startswith("sentinel://"):
    broker_transport_options["master_name"] = _settings.sentinel_master
    result_backend_transport_options = {"master_name": _settings.sentinel_master}

# The listener acks early, so there is nothing to cancel on a broker
# connection loss (stated: Celery 6 changes the default).
worker_cancel_long_running_tasks_on_connection_loss = False

# No time limits: the listener runs until it is stopped or loses its lease.
task_time_limit = None
task_soft_time_limit = None

# Listener progress is logged, not stored.
task_ignore_result = False
worker_send_task_events = False
