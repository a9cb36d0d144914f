"""Reading results and reporting them: the results reader, paired statistics, the verdict, the frontier,
the task table and the figures. Torch-free. ``python -m miq.report DIR``."""
