import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Nothing in the tests may reach the network: fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a fresh process, offline, output captured."""
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, env={**os.environ, **CLI_ENV},
                          capture_output=True, text=True, timeout=timeout)


def random_images(n: int, seed: int | None = None) -> list[Image.Image]:
    """Fresh random images (seed None: new entropy every run)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_adapter():
    """The random-weight tiny LLaVA behind the framework's adapter (CPU, float32)."""
    from vlcache.models.adapter import LlavaAdapter
    from vlcache.zoo.model import build_random_llava

    model, processor = build_random_llava(seed=0)
    return LlavaAdapter(model, processor, "cpu")


@pytest.fixture
def batch_inputs(tiny_adapter):
    """Two left-padded prompts of different lengths, one image each."""
    questions = ["What is the total?", "Which colour is the largest shape in the picture, and where is it?"]
    return tiny_adapter.build_inputs(questions, [[im] for im in random_images(2)])


def preset(name: str, **over) -> dict:
    """A policy config as Hydra composes it, for the presets of conf/policy/."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"policy={name}"])
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    policy.update(over)
    return policy
