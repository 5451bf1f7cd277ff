"""A small stand-in for Canonical's testflinger (server, agent, CLI), for labvisor's tests.

Written from the behaviour recorded in labvisor's notes (see README.md here), not from
testflinger's code. Python 3 standard library only, so it runs in labvisor/tf-style:local.

    testflinger_standin.py server --port N [--host ADDR] [--agent-token TOKEN]
    testflinger_standin.py agent -c CONFIG [--token-file FILE]      (testflinger-agent)
    testflinger_standin.py cli [--server URL] submit|results|cancel|status ...  (testflinger-cli)
    testflinger_standin.py device-connector TYPE PHASE -c CONFIG JOB_JSON (testflinger-device-connector)
"""

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from logging.handlers import TimedRotatingFileHandler

PHASES = ["setup", "provision", "firmware_update", "test", "allocate", "reserve"]
DONE = ("complete", "completed", "cancelled")
DEFAULT_TOKEN_FILE = "/var/lib/testflinger-agent/refresh_token"
DEFAULT_SERVER = "https://testflinger.canonical.com"


# --- a YAML subset (mappings, lists, block scalars, plain scalars) or JSON --------------------

def load_yaml(text):
    if text.lstrip().startswith(("{", "[")):
        return json.loads(text)
    lines = [line.rstrip() for line in text.splitlines()]
    i = _skip(lines, 0)
    return _block(lines, i, _indent(lines[i]))[0] if i < len(lines) else None


def _skip(lines, i):
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    return i


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _scalar(s):
    if s[:1] in "\"'" and s[-1:] == s[:1]:
        return json.loads(s) if s[0] == '"' else s[1:-1].replace("''", "'")
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except ValueError:
            return [_scalar(x.strip()) for x in s[1:-1].split(",") if x.strip()]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _block(lines, i, ind):
    if lines[i].lstrip().startswith("-"):
        out = []
        while (i := _skip(lines, i)) < len(lines) and _indent(lines[i]) == ind \
                and lines[i].lstrip().startswith("-"):
            rest = lines[i].strip()[1:].strip()
            if not rest:
                j = _skip(lines, i + 1)
                value, i = _block(lines, j, _indent(lines[j]))
            elif ": " in rest or rest.endswith(":"):
                lines[i] = " " * (ind + 2) + rest
                value, i = _block(lines, i, ind + 2)
            else:
                value, i = _scalar(rest), i + 1
            out.append(value)
        return out, i
    out = {}
    while (i := _skip(lines, i)) < len(lines) and _indent(lines[i]) == ind:
        key, _, rest = lines[i].strip().partition(":")
        key, rest = _scalar(key.strip()), rest.strip()
        if rest[:1] in ("|", ">"):
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > ind):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            cut = min((_indent(b) for b in body if b.strip()), default=0)
            value = "\n".join(b[cut:] for b in body) + ("" if rest.endswith("-") else "\n")
        elif rest:
            value, i = _scalar(rest), i + 1
        else:
            j = _skip(lines, i + 1)
            nested = j < len(lines) and (_indent(lines[j]) > ind or (
                _indent(lines[j]) == ind and lines[j].lstrip().startswith("-")))
            value, i = _block(lines, j, _indent(lines[j])) if nested else (None, i + 1)
        out[key] = value
    return out, i


# --- HTTP -------------------------------------------------------------------------------------

class HTTPFailure(Exception):
    def __init__(self, code, url, body):
        super().__init__(f"{code} Client Error: {body.strip() or 'error'} for url: {url}")
        self.code = code


def http(method, url, data=None, token=None):
    """One JSON request; returns (status, decoded body or None). Raises HTTPFailure on >= 400."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raise HTTPFailure(e.code, url, e.read().decode(errors="replace")) from None


# --- server -----------------------------------------------------------------------------------

class Store:
    def __init__(self, agent_token):
        self.lock = threading.Lock()
        self.jobs = {}  # job_id -> {"job", "result", "taken"}
        self.order = []
        self.queues = set()
        self.agents = {}
        self.agent_token = agent_token


class Handler(BaseHTTPRequestHandler):
    store = None

    def log_message(self, fmt, *args):
        sys.stderr.write("server: " + (fmt % args) + "\n")

    def reply(self, code, body=None):
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        s = self.store
        with s.lock:
            if parts == ["v1", "job"]:
                if s.agent_token and self.headers.get("Authorization") != f"Bearer {s.agent_token}":
                    return self.reply(403, {"message": "Agent not authorized"})
                queues = urllib.parse.parse_qs(url.query).get("queue", [])
                s.queues.update(queues)
                for job_id in s.order:
                    entry = s.jobs[job_id]
                    if not entry["taken"] and entry["job"].get("job_queue") in queues \
                            and entry["result"]["job_state"] == "waiting":
                        entry["taken"] = True
                        return self.reply(200, dict(entry["job"], job_id=job_id))
                return self.reply(204)
            if len(parts) == 3 and parts[:2] == ["v1", "job"] and parts[2] in s.jobs:
                return self.reply(200, s.jobs[parts[2]]["job"])
            if len(parts) == 3 and parts[:2] == ["v1", "result"] and parts[2] in s.jobs:
                return self.reply(200, s.jobs[parts[2]]["result"])
            if len(parts) == 4 and parts[:2] == ["v1", "queues"] and parts[3] == "agents":
                if parts[2] not in s.queues:
                    return self.reply(404, {"message": f"Queue '{parts[2]}' does not exist."})
                names = [a for a, d in s.agents.items() if parts[2] in d.get("queues", [])]
                return self.reply(200, names)
            if parts == ["v1", "agents", "data"]:
                return self.reply(200, [dict(d, name=a) for a, d in s.agents.items()])
        return self.reply(404, {"message": "Not found"})

    def do_POST(self):
        parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
        data = self.body()
        s = self.store
        with s.lock:
            if parts == ["v1", "job"]:
                if not data.get("job_queue"):
                    return self.reply(422, {"message": "job_queue is required"})
                job_id = str(uuid.uuid4())
                s.jobs[job_id] = {"job": data, "result": {"job_state": "waiting"}, "taken": False}
                s.order.append(job_id)
                return self.reply(200, {"job_id": job_id})
            entry = s.jobs.get(parts[2]) if len(parts) > 2 else None
            if parts[:2] == ["v1", "result"] and entry and len(parts) == 3:
                if entry["result"]["job_state"] == "cancelled":
                    data.pop("job_state", None)
                entry["result"].update(data)
                return self.reply(200)
            if parts[:2] == ["v1", "result"] and entry and parts[3:] == ["log", "output"]:
                key = f"{data.get('phase')}_output"
                entry["result"][key] = entry["result"].get(key, "") + data.get("log_data", "")
                return self.reply(200)
            if parts[:2] == ["v1", "job"] and entry and parts[3:] == ["action"]:
                state = entry["result"]["job_state"]
                if data.get("action") != "cancel":
                    return self.reply(400, {"message": "unknown action"})
                if state in DONE:
                    return self.reply(400, {"message": f"Job {parts[2]} is already in {state} state "
                                                       "and cannot be cancelled"})
                entry["result"]["job_state"] = "cancelled"
                return self.reply(200)
            if parts[:3] == ["v1", "agents", "data"] and len(parts) == 4:
                if s.agent_token and self.headers.get("Authorization") != f"Bearer {s.agent_token}":
                    return self.reply(403, {"message": "Agent not authorized"})
                s.agents.setdefault(parts[3], {}).update(data)
                s.queues.update(data.get("queues", []))
                return self.reply(200)
        return self.reply(404, {"message": "Not found"})


def serve(args):
    Handler.store = Store(args.agent_token)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    sys.stderr.write(f"server: listening on {args.host}:{args.port}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


# --- agent ------------------------------------------------------------------------------------

ALLOWED = {"agent_id", "identifier", "polling_interval", "server_address", "execution_basedir",
           "logging_basedir", "results_basedir", "logging_level", "logging_quiet", "job_queues",
           "location", "provision_type", "advertised_queues", "advertised_images",
           "global_timeout", "output_timeout", "output_bytes"} | {
    f"{p}_command" for p in PHASES + ["cleanup"]}
log = logging.getLogger("testflinger-agent")


class Agent:
    def __init__(self, cfg, token):
        self.cfg, self.token = cfg, token
        address = cfg["server_address"]
        self.server = (address if "://" in address else "http://" + address).rstrip("/")
        self.in_job = False
        self.proc = None  # the running phase's shell
        self.stop_job = False  # SIGTERM or cancel: skip the remaining phases
        self.restart = False  # SIGUSR1: exit after the current job

    def on_sigterm(self, *_):
        if self.in_job:
            log.info("Received SIGTERM: stopping the running phase command")
            self.stop_job = True
            if self.proc is not None:
                self.proc.terminate()  # the shell only, no process group (as the real agent)
        elif os.getpid() == 1:
            log.info("Received SIGTERM as PID 1: ignored")
        else:
            sys.exit(0)

    def on_sigusr1(self, *_):
        log.info("Received SIGUSR1: the agent will exit after the current job")
        self.restart = True

    def post(self, path, data):
        try:
            http("POST", self.server + path, data, self.token)
        except (OSError, HTTPFailure) as e:
            log.error("POST %s failed: %s", path, e)

    def set_state(self, state, job_id=""):
        self.post(f"/v1/agents/data/{self.cfg['agent_id']}",
                  {"state": state, "job_id": job_id, "queues": self.cfg["job_queues"]})

    def loop(self):
        self.set_state("waiting")
        while not self.restart:
            log.info("Checking jobs")
            query = urllib.parse.urlencode([("queue", q) for q in self.cfg["job_queues"]])
            try:
                _, job = http("GET", f"{self.server}/v1/job?{query}", None, self.token)
            except HTTPFailure as e:
                if e.code == 403:
                    log.error("Agent not authorized to request jobs.")
                log.error("%s", e)
                job = None
            except OSError as e:
                log.error("Unable to reach the server: %s", e)
                job = None
            if job:
                self.run_job(job)
                continue
            interval = float(self.cfg.get("polling_interval", 10))
            log.info("Sleeping for %s", interval)
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not self.restart:
                time.sleep(0.05)
        log.info("Restart requested: exiting after the current job")
        self.set_state("restart")

    def run_job(self, job):
        job_id = job["job_id"]
        rundir = os.path.join(self.cfg["execution_basedir"], job_id)
        os.makedirs(rundir, exist_ok=True)
        with open(os.path.join(rundir, "testflinger.json"), "w") as f:
            json.dump(job, f)
        log.info("Starting job %s", job_id)
        self.stop_job, self.in_job = False, True
        try:
            for phase in PHASES:
                if self.stop_job or self.cancelled(job_id) or not self.wanted(phase, job):
                    continue
                if self.run_phase(job_id, phase, rundir, job) != 0 and phase != "test":
                    break
        finally:
            self.stop_job = False
            if self.cfg.get("cleanup_command"):
                self.run_phase(job_id, "cleanup", rundir, job)
            self.post(f"/v1/result/{job_id}", {"job_state": "complete"})
            shutil.rmtree(rundir, ignore_errors=True)
            self.in_job = False
            log.info("Job %s finished", job_id)
            self.set_state("waiting")

    def wanted(self, phase, job):
        if phase == "setup":
            return bool(self.cfg.get("setup_command"))
        data = job.get(f"{phase}_data")
        if not data or (isinstance(data, dict) and data.get("skip")):
            return False
        return bool(self.cfg.get(f"{phase}_command")) or phase == "test"

    def cancelled(self, job_id):
        try:
            _, result = http("GET", f"{self.server}/v1/result/{job_id}", None, self.token)
            return (result or {}).get("job_state") == "cancelled"
        except (OSError, HTTPFailure):
            return False

    def run_phase(self, job_id, phase, rundir, job):
        cmd = self.cfg.get(f"{phase}_command")
        if not cmd:  # the stand-in's own device connector: test_cmds run with sh
            cmds = job.get("test_data", {}).get("test_cmds", "")
            cmd = "\n".join(cmds) if isinstance(cmds, list) else cmds
        self.post(f"/v1/result/{job_id}", {"job_state": phase})
        self.set_state(phase, job_id)
        log.info("Running %s_command", phase)
        env = dict(os.environ, **{k: v for k, v in self.cfg.items() if isinstance(v, str)})
        logfile = os.path.join(rundir, f"{phase}.log")
        with open(logfile, "ab") as out:
            self.proc = subprocess.Popen(["sh", "-c", cmd], cwd=rundir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self.stop_job:  # SIGTERM between the phase's start and its command's
                self.proc.terminate()
            while self.proc.poll() is None:
                time.sleep(0.2)
                if phase not in ("provision", "cleanup") and self.cancelled(job_id):
                    log.info("Job %s was cancelled: stopping %s", job_id, phase)
                    self.stop_job = True
                    self.proc.terminate()
                    self.proc.wait()
        code, self.proc = self.proc.returncode, None
        with open(logfile, errors="replace") as f:
            output = f.read()
        self.post(f"/v1/result/{job_id}/log/output", {
            "fragment_number": 0, "timestamp": datetime.now(timezone.utc).isoformat(),
            "phase": phase, "log_data": output})
        self.post(f"/v1/result/{job_id}", {f"{phase}_status": code})
        return code


def read_token(path):
    with open(path) as f:
        text = f.read().strip()
    try:
        return json.loads(text)["refresh_token"]
    except (ValueError, KeyError, TypeError):
        return text


def agent(args):
    with open(args.config) as f:
        cfg = load_yaml(f.read()) or {}
    extra = sorted(set(cfg) - ALLOWED)
    missing = [k for k in ("agent_id", "server_address", "job_queues") if k not in cfg]
    if extra or missing:
        what = f"extra keys not allowed @ data['{extra[0]}']" if extra else \
            f"required key not provided @ data['{missing[0]}']"
        sys.stderr.write(f"voluptuous.error.MultipleInvalid: {what}\n")
        return 0  # the real agent exits 0 here
    cfg.setdefault("execution_basedir", "/tmp/testflinger/run")
    cfg.setdefault("logging_basedir", "/tmp/testflinger/logs")
    cfg.setdefault("results_basedir", "/tmp/testflinger/results")
    fmt = logging.Formatter("[%(asctime)s] %(levelname)+7.7s: %(message)s")
    handlers = [] if cfg.get("logging_quiet") else [logging.StreamHandler(sys.stderr)]
    try:
        os.makedirs(cfg["logging_basedir"], exist_ok=True)
        handlers.append(TimedRotatingFileHandler(
            os.path.join(cfg["logging_basedir"], "testflinger-agent.log"), when="midnight"))
    except OSError:
        pass
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(cfg.get("logging_level", "INFO"))
    token = None
    try:
        token = read_token(args.token_file or DEFAULT_TOKEN_FILE)
    except OSError:
        log.error("Failed to read token file")
    a = Agent(cfg, token)
    signal.signal(signal.SIGTERM, a.on_sigterm)
    signal.signal(signal.SIGUSR1, a.on_sigusr1)
    a.loop()
    return 0


# --- device connector -------------------------------------------------------------------------

def device_connector(args):
    """`testflinger-device-connector TYPE PHASE -c CONFIG JOB_JSON`: `runtest` runs the job's
    `test_data.test_cmds` with `sh`, with the config's `env` added; every other phase does
    nothing, as `noprovision` does."""
    if args.phase != "runtest":
        print(f"{args.type} {args.phase}: nothing to do", flush=True)
        return 0
    with open(args.config) as f:
        cfg = load_yaml(f.read()) or {}
    with open(args.job) as f:
        job = json.load(f)
    cmds = (job.get("test_data") or {}).get("test_cmds", "")
    cmds = "\n".join(cmds) if isinstance(cmds, list) else cmds
    env = dict(os.environ, **{k: str(v) for k, v in (cfg.get("env") or {}).items()})
    return subprocess.call(["sh", "-c", cmds], env=env)


# --- CLI --------------------------------------------------------------------------------------

def cli(args):
    server = (args.server or os.environ.get("TESTFLINGER_SERVER") or DEFAULT_SERVER).rstrip("/")
    try:
        return CLI_COMMANDS[args.command](server, args)
    except HTTPFailure as e:
        sys.stderr.write(f"Error: {e}\n")
    except OSError as e:
        sys.stderr.write(f"Error communicating with server {server}: {e}\n")
    return 1


def cli_submit(server, args):
    with open(args.file) as f:
        job = load_yaml(f.read())
    queue = (job or {}).get("job_queue")
    if not queue:
        sys.stderr.write("Error: the job has no job_queue\n")
        return 1
    try:
        http("GET", f"{server}/v1/queues/{urllib.parse.quote(queue)}/agents")
    except HTTPFailure as e:
        if e.code != 404:
            raise
        sys.stderr.write(f"ERROR: Queue '{queue}' does not exist.\n")
        return 1
    _, reply = http("POST", f"{server}/v1/job", job)
    job_id = reply["job_id"]
    history_dir = os.path.join(os.environ.get("HOME", "/"), ".config")
    os.makedirs(history_dir, exist_ok=True)
    history = os.path.join(history_dir, "testflinger-cli-history.json")
    with open(history, "a") as f:
        f.write(json.dumps({"job_id": job_id, "queue": queue, "submission_time": time.time()}) + "\n")
    print(job_id if args.quiet else f"Job submitted successfully!\njob_id: {job_id}", flush=True)
    if args.poll:
        poll(server, job_id)
    return 0  # also when a phase failed: read `results`


def poll(server, job_id):
    state, printed = None, {}
    while True:
        _, result = http("GET", f"{server}/v1/result/{job_id}")
        if result["job_state"] != state:
            state = result["job_state"]
            print(f"This job is {state}", flush=True)
        for key, text in result.items():
            if key.endswith("_output") and len(text) > printed.get(key, 0):
                sys.stdout.write(text[printed.get(key, 0):])
                printed[key] = len(text)
        sys.stdout.flush()
        if state in DONE:
            return
        time.sleep(0.5)


def cli_results(server, args):
    print(json.dumps(http("GET", f"{server}/v1/result/{args.job_id}")[1], indent=2))
    return 0


def cli_status(server, args):
    print(http("GET", f"{server}/v1/result/{args.job_id}")[1]["job_state"])
    return 0


def cli_cancel(server, args):
    http("POST", f"{server}/v1/job/{args.job_id}/action", {"action": "cancel"})
    return 0


CLI_COMMANDS = {"submit": cli_submit, "results": cli_results, "status": cli_status,
                "cancel": cli_cancel}


def main(argv):
    p = argparse.ArgumentParser(prog="testflinger_standin.py", description=__doc__.split("\n")[0])
    roles = p.add_subparsers(dest="role", required=True)
    s = roles.add_parser("server", help="the job API, in memory")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--agent-token", help="refresh token agents must present (403 otherwise)")
    a = roles.add_parser("agent", help="testflinger-agent")
    a.add_argument("-c", "--config", required=True)
    a.add_argument("--token-file", help=f"default: {DEFAULT_TOKEN_FILE}")
    c = roles.add_parser("cli", help="testflinger-cli")
    c.add_argument("--server", help=f"also TESTFLINGER_SERVER; default {DEFAULT_SERVER}")
    cmds = c.add_subparsers(dest="command", required=True)
    sub = cmds.add_parser("submit")
    sub.add_argument("file")
    sub.add_argument("--poll", "-p", action="store_true")
    sub.add_argument("--quiet", "-q", action="store_true")
    for name in ("results", "status", "cancel"):
        cmds.add_parser(name).add_argument("job_id")
    d = roles.add_parser("device-connector", help="testflinger-device-connector")
    d.add_argument("type")
    d.add_argument("phase")
    d.add_argument("-c", "--config", required=True)
    d.add_argument("job")
    args = p.parse_args(argv)
    return {"server": serve, "agent": agent, "cli": cli,
            "device-connector": device_connector}[args.role](args) or 0


if __name__ == "__main__":
    ROLE = {"testflinger-agent": "agent", "testflinger-cli": "cli",
            "testflinger-device-connector": "device-connector"}.get(
        os.path.basename(sys.argv[0]))
    sys.exit(main(([ROLE] if ROLE else []) + sys.argv[1:]))
