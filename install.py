"""A1111 and Forge run this at every WebUI start and after an install from URL (as a subprocess).

Fast and silent when everything is present; otherwise installs only what is missing, never a
package the WebUI pins: ours (lib_lora/hosts/webui_requirements.py) and every package the host's
own requirements_versions.txt names (Forge's gradio 4, transformers 4.46.1, diffusers...). A failure prints the
package and the command to run by hand, and the WebUI still starts: the tab says what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib_lora.hosts import webui_requirements as reqs  # noqa: E402
from lib_lora.hosts.webui_requirements import command_line  # noqa: E402


def _pip(args: list[str], desc: str) -> None:
    """Run pip through A1111's helper when we run inside its launcher, else directly."""
    try:
        import launch  # A1111's launch.py: run_pip adds --prefer-binary and the index URL

        launch.run_pip(command_line(args), desc)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def host_pinned_names() -> list[str]:
    """The names the host WebUI's requirements_versions.txt pins (none outside a WebUI)."""
    path = reqs.host_pins_file(os.path.dirname(os.path.abspath(__file__)))
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as fh:
            return list(reqs.host_pins(fh.read()))
    except (OSError, UnicodeDecodeError):
        return []


def main() -> int:
    host = host_pinned_names()
    installed = reqs.installed_distributions(reqs.relevant_names(host))
    steps = reqs.plan(installed, host)
    for req, dist, version in reqs.blocked(installed, host):
        print(f"Fast LoRA: {reqs.blocked_message(req, dist, version)}", file=sys.stderr)
    if not steps:
        return 0
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "host-pins.txt")
        with open(constraints, "w", encoding="utf-8") as fh:
            fh.write(reqs.pin_constraints(installed, host))
        for step in steps:
            desc = f"Fast LoRA requirement(s): {', '.join(step.names)}"
            try:
                _pip(step.pip_args(constraints), desc)
            except (Exception, SystemExit) as err:  # run_pip raises RuntimeError; never stop the WebUI
                failed.append((step, err))
    for step, err in failed:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        by_hand = command_line([sys.executable, "-m", "pip", *step.pip_args()])
        print(
            f"Fast LoRA: could not install {', '.join(step.names)} ({reason}). "
            f"The WebUI still starts; run this by hand, then restart it:\n    {by_hand}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    main()  # exit status 0 either way: A1111 reports a failing installer as an error
