"""jobs: Ray and MLflow orchestration of the detectors in `padim_core`, one package per job
(`fit`, `score`, `shift`, `demo`) over a shared core (`jobs.common`)."""
