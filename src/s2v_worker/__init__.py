"""RunPod serverless worker for Wan2.2-S2V-14B (speech-to-video).

Modules in the order a job flows through them: settings, job (schema), media (intake), pipeline
(load + generate, on the official Wan2.2 code imported by official.py), video (MP4 encoding),
storage (delivery), runner (the job runner that ties them together).
"""
