"""Running the method matrix: locally (one process per configuration, a GPU each where there are GPUs) or
as Slurm jobs; resume, failure notes, signals. ``python -m miq.sweep``."""
