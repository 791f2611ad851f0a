"""The engine: the job schema, gradient access (the only DeepSpeed internals), the step, the
DeepSpeed build/export, the Ray Train loop and the driver. It knows nothing of images or text:
a task (hamu_ray.tasks) supplies models, batches and log-likelihoods."""
