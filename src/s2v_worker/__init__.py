"""RunPod serverless worker for Wan2.2-S2V-14B (speech-to-video).

Modules in the order a job flows through them: settings (the environment), job (schema), media
(intake, over net and decoders), planning (sizes, clips), lora (the job's LoRA files), pipeline
(encode, sample, decode; the DiT behind it is the Denoiser's), video (MP4 encoding), storage
(delivery, with bucket), runner (the job runner that ties them together). docs/architecture.md has
the whole map.
"""
