"""Development tools, never part of a deployed worker's job path.

    local_endpoint.py   a local RunPod endpoint (both sides of RunPod's queue API) on loopback,
                        so the real worker loop and the SDK's real client meet on one machine;
                        ``make serve`` runs it, and pod mode (``WORKER_MODE=pod``) serves the
                        worker through it on a GPU pod

May import ``serving`` (its configuration and errors); nothing in ``serving`` or the forker's
files imports it, except ``serving/launch.py``, which starts it in pod mode.
"""
