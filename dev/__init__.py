"""Development tools, never part of a deployed worker's job path.

    local_endpoint.py   a local RunPod endpoint (both sides of RunPod's queue API) on loopback,
                        so the real worker loop and the SDK's real client meet on one machine;
                        ``make serve`` runs it, and pod mode (``WORKER_MODE=pod``) serves the
                        worker through it on a GPU pod. Its command line, and the names
                        tests import; the parts:
    jobs.py             the platform's job protocol: queue, job states, worker routes
    server.py           the HTTP server: client routes, the key check, connection limits
    worker_process.py   a worker process run against the endpoint
    task_example.py     the served task's example input, for the banner (imports the tasks,
                        in a process of its own)
    wire.py             JSON errors, capped and timed body reads, the key comparison,
                        the cap on connections per peer address

May import ``serving`` (its configuration and errors); ``task_example.py`` alone imports the
project's tasks. Nothing in ``serving`` or the forker's files imports ``dev``: pod mode starts
it as a program (``serving/launch.py``), so a serverless start never loads it or aiohttp.
"""
