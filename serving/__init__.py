"""The serving internals: everything between RunPod's job and a task, the same for every model.

A forker changes the files at the top of the repository (``handler.py``, ``model_loader.py``,
``storage.py``, ``tasks/``, ``builder/``, ``Dockerfile``) and rarely anything here. What lives
here, one concern per module:

    worker.py         job -> task -> answer: validation of the envelope, output_mode, batch jobs,
                      the whole-job time limit, delivery, and the error boundary
    job.py            the job context a task is given (``tasks.base`` re-exports it)
    engine.py         the decode loop of the generate task (sampling, stop strings, KV cache)
    graphs.py         the same loop with a static KV cache and one compiled, graph-captured
                      step (WORKER_DECODE): the GPU's fast path
    batcher.py        work from concurrent jobs gathered into shared forward passes
    runner.py         the seam's machinery: a task's declared batching, its items, task settings
    batchfile.py      batch jobs' items read from a downloaded file, and answers spooled to disk
    inputs.py         the Image, Audio and File input types: fetched and decoded for a task
    media.py          image decoding under structural limits, in the decode pool
    audio.py          audio decoding and resampling (PyAV), and WAV/FLAC/MP3 encoding
    families.py       the kinds served with no code: their parameters and answers
    text_runners.py   the kinds transformers 5 has no pipeline for (text2text, QA, captioning)
    device.py         the one device thread, and what an out-of-memory or device fault means
    placement.py      device, dtype and placement of the weights; the types of a model in memory
    loading.py        which task serves the model; its load, warm-up and startup line
    config.py         every setting, read from the environment in one typed place
    detect.py         what kind of model a directory holds, read exactly from its config
    errors.py         the error tree, and the one place an exception becomes a job answer
    validation.py     the job envelope and pydantic input helpers tasks use
    delivery.py       inline answers, or links to stored answers and files
    downloads.py      safe downloads of job inputs (http(s), s3), under total deadlines
    s3.py             the S3 client: checked uploads, links and reads, retries, safe errors
    s3wire.py         its connections: the address rule, each operation's time limit, a reply budget
    s3config.py       a job's own s3Config, checked, as the storage for that job
    stored.py         object keys and the link object every storage backend returns
    netguard.py       the address rule every job-directed connection obeys, and a watchdog
    redaction.py      secrets masked in everything the process prints
    openai_compat.py  RunPod's OpenAI-compatible routes, translated onto the task
    launch.py         what the container runs: the worker loop, or pod mode
    start.py          the worker process: load once, then the test mode or the SDK's worker loop
    intake.py         how the SDK's worker loop takes jobs: each counted once, freed slots refilled
    patches.py        every patch of a third-party package's internals, and the version it fits
    parts.py          the seam: the project's own pieces, handed in by ``handler.py``

The seam, stated once: modules here never import the project's own modules (``handler``,
``model_loader``, ``storage``, ``tasks``) nor ``dev/`` at runtime (their types only for
annotations); ``handler.py`` hands in the task registry, ``model_loader.find_model`` and the
storage factory as one ``parts.Parts``
(``tests/test_import_rules.py`` checks it). The project's modules import from here the helpers a
task or a loader uses (``config``, ``errors``, ``device``, ``validation``, ``batcher``,
``delivery``, ``downloads``, ``placement``, ``job``).
"""
