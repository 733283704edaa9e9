"""Helper of scripts/ui-screenshots.sh: after ``heimdex demo``, make the Dagster UI have something to show.

``prepare``: edits the transcript of the first scene of two READY videos (their text vectors and search
documents turn stale), marks the demo's PROCESSING video READY and registers its partition as video
discovery would (missing everywhere), ticks ``freshness_checks_sensor`` once in this process and executes
its run as the daemon would (per-partition check results), then runs the ``reprocess`` job (scope all) as
the Launchpad would: backfills of the stale and missing partitions (with the fresh ones a contiguous run slice
carries between them), left requested (no daemon here).
Prints a JSON summary.

``wait URL [SECONDS]``: waits until the webserver at URL (its /graphql) has loaded the code location.

``shoot OUT_DIR BASE_URL BUDGET_MS SHOT...``: one headless Chromium (``CHROMIUM``, default chromium; --no-sandbox
for root), driven over the DevTools protocol, takes a 1600x1000 PNG ``OUT_DIR/NAME.png`` of each SHOT, given as
``NAME<TAB>PATH[<TAB>LABEL...]``: the page BASE_URL+PATH once it has settled (at most BUDGET_MS each), after a
click on each LABEL in turn (the last element showing that text; a prefix when it ends with ``*``): for the tabs and
selections that the UI keeps out of its URL.

Environment: the demo's (HEIMDEX_HOME, HEIMDEX_EMBEDDED_PG_PORT, HEIMDEX_CLIP_MODEL, ...) and DAGSTER_HOME.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORKSPACE_STATUS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"


def prepare() -> dict:
    import dagster as dg
    from sqlalchemy import select, update

    from heimdex_assets.assets import DERIVED_ASSETS, SOURCE_ASSETS
    from heimdex_assets.db.tables import scenes, videos
    from heimdex_assets.jobs import reprocess_job
    from heimdex_assets.launch import dagster_instance
    from heimdex_assets.partitions import videos_partitions
    from heimdex_assets.sensors.freshness_checks import freshness_checks_sensor, record_freshness_checks_job
    from heimdex_assets.sensors.video_discovery import plan_video_partitions
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    db = resources["db"]
    instance = dagster_instance()
    with db.transaction() as conn:
        in_order = select(videos.c.id).order_by(videos.c.created_at, videos.c.id)
        edited = [str(v) for v in conn.execute(in_order.where(videos.c.status == "READY").limit(2)).scalars()]
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id.in_(edited), scenes.c.scene_index == 0)
            .values(transcript="A corrected transcript: the narrator now names the harbour master.")
        )
        processing = [str(v) for v in conn.execute(in_order.where(videos.c.status == "PROCESSING")).scalars()]
        conn.execute(update(videos).where(videos.c.status == "PROCESSING").values(status="READY"))
    with db.engine.connect() as conn:
        new_keys, _ = plan_video_partitions(conn, set(instance.get_dynamic_partitions(videos_partitions.name)))
    instance.add_dynamic_partitions(videos_partitions.name, new_keys)

    sensor_resources = {k: resources[k] for k in ("db", "clip", "text_embedder", "person_detector", "search_index")}
    with dg.build_sensor_context(instance=instance, resources=sensor_resources) as context:
        tick = freshness_checks_sensor(context)
    recorded = 0
    for request in tick.run_requests or []:
        run = record_freshness_checks_job.execute_in_process(run_config=request.run_config, instance=instance)
        recorded += sum(1 for e in run.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")

    defs = dg.Definitions(assets=[*SOURCE_ASSETS, *DERIVED_ASSETS], jobs=[reprocess_job], resources=resources)
    result = defs.get_job_def("reprocess").execute_in_process(
        run_config={"ops": {"reprocess_op": {"config": {"scope": "all"}}}}, instance=instance
    )
    return {
        "stale_videos": edited,
        "missing_videos": processing,
        "registered": new_keys,
        "check_results_recorded": recorded,
        "backfills": result.output_for_node("reprocess_op"),
        "dagster_home": str(instance.root_directory),
    }


def wait(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = httpx.post(url, json={"query": WORKSPACE_STATUS}, timeout=5).json()["data"]
            entries = data["workspaceOrError"].get("locationEntries") or []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(1)
    sys.exit(f"the webserver at {url} did not load the code location in {seconds:.0f} s")


# Whether the page has settled: loaded, no spinner or loading skeleton, and its text unchanged since the last look.
_SETTLED = """(() => {
  if (document.readyState !== "complete") return "";
  if (document.querySelector('[class*="Spinner"], [class*="spinner"], [class*="Skeleton"], [role="progressbar"]'))
    return "";
  return String(document.body.innerText.length) + ":" + document.querySelectorAll("*").length;
})()"""

# Clicks the last of the innermost elements whose text is the label (a prefix when it ends with "*").
_CLICK = """((label) => {
  const prefix = label.endsWith("*") ? label.slice(0, -1) : null;
  const hit = (e) => {
    const text = (e.innerText || "").trim();
    return prefix === null ? text === label : text.startsWith(prefix);
  };
  const matches = [...document.body.querySelectorAll("*")].filter(hit);
  const innermost = matches.filter((e) => !matches.some((m) => m !== e && e.contains(m)));
  if (!innermost.length) return false;
  innermost[innermost.length - 1].click();
  return true;
})(%s)"""


class DevTools:
    """Just enough of the Chrome DevTools protocol: one page, commands answered in order."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect  # websockets: with dagster-webserver (uvicorn[standard])

        self.ws = connect(ws_url, max_size=64 * 2**20, proxy=None, compression=None, legacy=True)
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def settle(self, budget_s: float) -> None:
        deadline, last, same = time.monotonic() + budget_s, None, 0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.evaluate(_SETTLED)
            same = same + 1 if now and now == last else 0
            last = now
            if same >= 4:  # two seconds without a change
                return


def shoot(out_dir: str, base_url: str, budget_ms: int, shots: list[str]) -> int:
    chromium = os.environ.get("CHROMIUM", "chromium")
    missed = 0
    with tempfile.TemporaryDirectory() as profile:
        argv = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1600,1000",
            "about:blank",
        ]
        browser = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not active.exists() or len(active.read_text().splitlines()) < 2:
                if time.monotonic() > deadline or browser.poll() is not None:
                    sys.exit(f"{chromium} did not start its DevTools endpoint")
                time.sleep(0.2)
            port = active.read_text().splitlines()[0]
            pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
            page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
            page.call("Page.enable")
            for shot in shots:
                name, path, *clicks = shot.split("\t")
                url = base_url.rstrip("/") + path
                page.call("Page.navigate", url=url)
                page.settle(budget_ms / 1000)
                for label in filter(None, clicks):
                    if not page.evaluate(_CLICK % json.dumps(label)):
                        print(f"nothing labelled {label!r} to click on {url}", file=sys.stderr)
                        missed += 1
                    page.settle(budget_ms / 1000)
                png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
                target = Path(out_dir) / f"{name}.png"
                target.write_bytes(png)
                then = f" then {', '.join(filter(None, clicks))}" if any(clicks) else ""
                print(f"{target}  <- {url}{then}", file=sys.stderr)
        finally:
            browser.terminate()
            try:
                browser.wait(timeout=20)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
    return 1 if missed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        print(json.dumps(prepare(), indent=2))
        return 0
    if argv[:1] == ["wait"] and len(argv) in (2, 3):
        wait(argv[1], float(argv[2]) if len(argv) == 3 else 180)
        return 0
    if argv[:1] == ["shoot"] and len(argv) >= 5:
        return shoot(argv[1], argv[2], int(argv[3]), argv[4:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
