"""The model process around the loop: ``model_worker.ModelWorker`` (loading, batches, progress,
cancel: service.py's ``InpaintWorker``), ``engine`` (continuous batching: jobs join the running loop
at step boundaries), ``batch`` (a batch of jobs through the loop, failures isolated), ``board``
(progress and cancellation), ``ledger`` (each job runs once), and ``triton_server`` (the same
model behind Triton). Never imports the front.
"""
