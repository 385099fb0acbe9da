"""`study submit`: run a study on a Ray cluster as a Ray job, through the cluster's job API (the dashboard port).

The spec is validated here first, exactly as the job will see it (relative paths against the working directory
that is uploaded), so that a typo costs one line of output and submits nothing.

Environment variables named with --env (HF_TOKEN for a gated model, say) travel to the job and its workers in the
job's runtime environment, with the values they have here: never in the spec, the command line or any file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from scaling_lab import spec as spec_lib

# Never uploaded with the working directory (Ray also leaves out what .gitignore names).
UPLOAD_EXCLUDES = [".venv", "results", ".git", "__pycache__", ".pytest_cache", "*.egg-info"]
# A cluster just started (by `ray up`, say) answers "No available agent to submit job, please try again later"
# until its dashboard agent is up: such answers are retried for this long.
TRANSIENT_RETRY_S = 60.0


def cmd_submit(args) -> None:
    working_dir = Path(args.working_dir).resolve()
    spec_path = Path(args.spec).resolve()
    if not spec_path.is_relative_to(working_dir):
        raise spec_lib.SpecError(f"{args.spec}: the spec must lie inside the working directory {working_dir}, "
                                 "which is what the cluster receives")
    with contextlib.chdir(working_dir):
        spec = _validated(spec_path, args.override)
    env_vars = passed_environment(args.env)
    entrypoint = shlex.join(
        ["python", "-m", "scaling_lab.study", "run", str(spec_path.relative_to(working_dir)),
         *(part for item in args.override for part in ("--override", item))]
    )
    job_id = _submit(args.address, entrypoint, working_dir, spec.name, env_vars)
    address = args.address or "$RAY_ADDRESS"
    results_location = spec.output_dir or f"results/{spec.name}"
    print(f"submitted study {spec.name!r} as Ray job {job_id}")
    if env_vars:
        print(f"  environment passed to the job: {', '.join(sorted(env_vars))} (values not shown)")
    print(f"  follow:   ray job logs --address {address} --follow {job_id}")
    print(f"  progress: python -m scaling_lab.study status {shlex.quote(results_location)}")
    print(f"  stop:     ray job stop --address {address} {job_id}")
    if "://" not in results_location and not Path(results_location).expanduser().is_absolute():
        print(f"warning: results go to {results_location} inside the job's working directory on the head node, "
              "which Ray deletes with the job's files; set output_dir to s3://..., gs://... or a shared absolute "
              "path", file=sys.stderr)


def _validated(spec_path: Path, overrides: list[str]) -> spec_lib.StudySpec:
    from scaling_lab.data import validate_data_source
    from scaling_lab.study.spec_checks import check_deepspeed_config

    spec = spec_lib.load(spec_path, overrides)
    validate_data_source(spec.data, Path.cwd())
    check_deepspeed_config(spec)
    return spec


def passed_environment(names: list[str]) -> dict[str, str]:
    """The named variables of this environment, for the job's runtime environment; a name not set is an error."""
    passed = {}
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise spec_lib.SpecError(f"--env {name!r}: expected the name of an environment variable")
        if name not in os.environ:
            raise spec_lib.SpecError(f"--env {name}: not set in this environment, so there is nothing to pass on")
        passed[name] = os.environ[name]
    return passed


def _submit(address: str | None, entrypoint: str, working_dir: Path, study: str, env_vars: dict[str, str]) -> str:
    from ray.job_submission import JobSubmissionClient

    runtime_env = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars  # the job's driver and every worker it starts inherit them
    deadline = time.monotonic() + TRANSIENT_RETRY_S
    while True:
        try:
            client = JobSubmissionClient(address)
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"study": study})
        except (OSError, RuntimeError, ValueError) as exc:  # OSError: requests' connection errors too
            if "try again later" in str(exc) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            print(f"error: cannot submit to the Ray job API at {address or '$RAY_ADDRESS'}: "
                  f"{' '.join(str(exc).split())[:500]}", file=sys.stderr)
            raise SystemExit(1) from None
