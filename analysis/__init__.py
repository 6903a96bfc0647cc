"""From result folders to paper figures: load sweeps into pandas, draw the figures, build the tables.

    from analysis import load_jobs, accuracy_vs_budget, main_table
    jobs = load_jobs("outputs/sweeps/vlcache_paper")
    accuracy_vs_budget(jobs, path="figures/accuracy_vs_budget.png")
    print(to_markdown(main_table(jobs)))

Every figure function returns the matplotlib Figure and, given `path`, also writes it as PNG.
"""

from analysis.accuracy import accuracy_vs_budget
from analysis.allocation import allocation_figure, job_allocation_figure
from analysis.load import load_jobs, load_samples, load_wandb
from analysis.patches import (
    KeptPatches,
    kept_patches_figure,
    kept_patches_for_job,
    kept_patches_for_sample,
    pick_job,
)
from analysis.speed import load_bench, speed_figure, speed_table
from analysis.tables import main_table, table_figure, to_latex, to_markdown

__all__ = [
    "KeptPatches",
    "accuracy_vs_budget",
    "allocation_figure",
    "job_allocation_figure",
    "kept_patches_figure",
    "kept_patches_for_job",
    "kept_patches_for_sample",
    "load_bench",
    "load_jobs",
    "load_samples",
    "load_wandb",
    "main_table",
    "pick_job",
    "speed_figure",
    "speed_table",
    "table_figure",
    "to_latex",
    "to_markdown",
]
