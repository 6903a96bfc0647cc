"""Sweeps at scale: the SLURM launcher's config, the submitit path end to end, the one-job-per-GPU pool."""

import json
import threading
import time

from fixture_task import write_fixture_task
from test_run import FIXTURE, ROOT, run


def test_slurm_launcher_config_renders_an_sbatch_array(tmp_path, monkeypatch):
    import os

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.array_parallelism=8", "hydra.launcher.timeout_min=30"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 8)
    # submitit refuses to build a SLURM executor without `srun`: a stand-in on PATH, nothing is submitted
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    params = {k: v for k, v in OmegaConf.to_container(launcher, resolve=False).items()
              if k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism")}
    executor = SlurmExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(partition=params["partition"], gpus_per_node=params["gpus_per_node"],
                               cpus_per_task=params["cpus_per_task"], mem=f"{params['mem_gb']}GB",
                               time=params["timeout_min"], array_parallelism=params["array_parallelism"])
    executor.parameters["map_count"] = 12  # a 12-job sweep
    script = executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --array=0-11%8" in script and "#SBATCH --time=30" in script


def test_sweep_through_submitit_local_executor(tmp_path):
    tasks = write_fixture_task(tmp_path / "tasks", n=2)
    result = run("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "budget=0.3,1.0",
                 f"dataset.task_dir={tasks}", *FIXTURE, f"output_root={tmp_path}", "sweep_name=sub")
    assert result.returncode == 0, result.stderr[-3000:]
    done = sorted((tmp_path / "sweeps" / "sub").glob("*/metrics.json"))
    assert len(done) == 2 and all(json.loads(p.read_text())["status"] == "ok" for p in done)


def test_gpu_pool_gives_each_job_its_own_gpu(tmp_path):
    from vlcache.gpu_pool import hold_gpu

    held, overlap, lock = [], [], threading.Lock()

    def job():
        with hold_gpu(2, tmp_path, poll_s=0.01) as index:
            with lock:
                if index in held:
                    overlap.append(index)
                held.append(index)
            time.sleep(0.05)
            with lock:
                held.remove(index)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap and not held
