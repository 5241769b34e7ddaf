"""RunPod entry point: this project's pieces, handed to the worker, which loads once and starts.

Run it:
    python handler.py                                  the RunPod worker loop (production), or
                                                       ./test_input.json when run locally
    python handler.py --test_input '{"input": {...}}'  one job, printed; exit 1 if it failed
    python handler.py --test_input @job.json           the same, the job read from a file
    python -m dev.local_endpoint -- python handler.py  a local endpoint that behaves like RunPod

The pieces are the fork's own: the task registry (``tasks/``), where the weights come from
(``model_loader.py``) and where files go (``storage.py``). ``serving/start.py`` does the rest:
the model loaded once, in the main process only, the test mode, the runpod worker loop. A
startup failure (bad setting, no model) prints one line saying what and how to fix it and exits
1 before any job is taken.

The pieces are imported inside ``parts``, not at the top: the process is prepared first (the
collector off, the secret filter on), and the SDK's heartbeat child, which runs this file
again, imports none of them.
"""

from __future__ import annotations

from serving.parts import Parts
from serving.start import serve


def parts() -> Parts:
    """What this worker is made of: change these lines to serve other tasks or store elsewhere."""
    from model_loader import find_model
    from storage import storage_from_settings
    from tasks import TASKS

    return Parts(tasks=TASKS, find_model=find_model, storage_from_settings=storage_from_settings)


if __name__ == "__main__":
    serve(parts)
