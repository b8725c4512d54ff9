"""The host adapter: the one place that knows ComfyUI. Each file is one concern (checks, families, sampling,
velocity, training, memory, timing, files, progress, the run and its settling, LoRA files, teacher latents, previews,
the headless loaders); the nodes above import what they use by name, the engine below knows none of it."""
