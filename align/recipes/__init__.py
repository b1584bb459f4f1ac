"""One file per stage: `main(cfg) -> Path` (the artifact it wrote), read top to bottom."""
