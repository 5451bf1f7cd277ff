//! Health-check jobs against a real mosquitto, the agent as a real process: one runs when none
//! ever ran, then after `after_jobs` jobs (counted across an agent restart, first in the queue)
//! and every `every`; each is marked in its status; a failing one takes the SUT offline, new
//! jobs are refused naming it, and once a person puts the SUT online a health check runs first
//! and jobs are taken again; one failing during maintenance leaves it as it is, and `online`
//! starts the held device process again.

mod common;

use std::time::Duration;

use common::{sut_toml, AgentProc, Collector, Seen};
use labvisor_tests::{wait_until, Mosquitto};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(20);

fn json(s: &Seen) -> Value {
    serde_json::from_str(&s.text).unwrap_or(Value::Null)
}

struct Lab {
    broker: Mosquitto,
    mqtt: Collector,
    agent: AgentProc,
    sut: String,
}

impl Lab {
    /// An agent whose `[health_check]` runs `hc.sh` (`script`), with `section` as its triggers.
    fn new(sut: &str, script: &str, section: &str) -> Lab {
        Lab::with_device(sut, None, script, section)
    }

    /// [`Lab::new`] with a device process running `command`.
    fn with_device(sut: &str, command: Option<&str>, script: &str, section: &str) -> Lab {
        let broker = Mosquitto::start();
        let mqtt = Collector::start(broker.port(), &[&format!("{sut}/#")]);
        let extra = format!("files = [\"hc.sh\"]\n[health_check]\njob = \"hc.sh\"\n{section}");
        let agent = AgentProc::start_with_files(
            sut,
            &sut_toml(command, &extra),
            &[("hc.sh", script)],
            Some(&broker.url()),
            &["--grace", "500ms"],
        );
        Lab {
            broker,
            mqtt,
            agent,
            sut: sut.to_owned(),
        }
    }

    fn t(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.sut)
    }

    fn submit(&self, payload: &str) {
        let out = self
            .broker
            .publish(&self.t("submit"), payload, &["-q", "1"]);
        assert!(out.status.success(), "{out:?}");
    }

    /// The first `n` final statuses on `last_job` (which also shows each job running), in order.
    fn finals(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} final statuses on last_job"), LIMIT, || {
            let all: Vec<Value> = (self.mqtt.on(&self.t("last_job")).iter())
                .map(json)
                .filter(|st| st["state"] != "running")
                .collect();
            (all.len() >= n).then(|| all[..n].to_vec())
        })
    }

    /// Every status published for job `id`.
    fn statuses(&self, id: &str) -> Vec<Value> {
        self.mqtt
            .on(&self.t(&format!("jobs/{id}")))
            .iter()
            .map(json)
            .collect()
    }

    /// The acknowledgement of the `n`th submission (1-based).
    fn ack(&self, n: usize) -> Value {
        wait_until(&format!("{n} acknowledgements"), LIMIT, || {
            let acks = self.mqtt.on(&self.t("submit_status"));
            acks.get(n - 1).map(json)
        })
    }
}

fn is_health_check(st: &Value) -> bool {
    st["health_check"] == true && st["id"].as_str().unwrap().starts_with("health-check-")
}

/// What a sequence of final statuses was: `hc` or the job's script name, with its state.
fn shape(finals: &[Value]) -> Vec<String> {
    finals
        .iter()
        .map(|st| {
            let what = if is_health_check(st) { "hc" } else { "job" };
            format!("{what}:{}", st["state"].as_str().unwrap())
        })
        .collect()
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_health_check_runs_at_first_start_then_after_n_jobs_first_in_the_queue_across_a_restart() {
    let mut lab = Lab::new("hc-jobs", "echo the board answers\n", "after_jobs = 2\n");
    // None ever ran on this volume: one runs at once.
    let first = lab.finals(1);
    assert_eq!(shape(&first), ["hc:passed"], "{first:?}");
    let hc1 = first[0]["id"].as_str().unwrap().to_owned();
    // Its status is marked at every step; its output goes where a job's goes.
    let statuses = lab.statuses(&hc1);
    let states: Vec<&str> = statuses
        .iter()
        .map(|s| {
            assert!(is_health_check(s), "{s}");
            s["state"].as_str().unwrap()
        })
        .collect();
    assert_eq!(states, ["queued", "running", "passed"]);
    lab.mqtt
        .wait(&lab.t(&format!("jobs/{hc1}/output")), LIMIT, |m| {
            m.text.contains("the board answers")
        });

    lab.submit("echo one");
    lab.finals(2);
    // A restart runs none by itself, and the count goes on from the journal.
    let boot = lab.mqtt.on(&lab.t("agent")).last().map(json).unwrap()["boot_id"].clone();
    lab.agent.restart();
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        let st = json(m);
        st["boot_id"] != boot && st["state"] == "idle" && st["broker_connected"] == true
    });
    lab.submit("sleep 1; echo two");
    lab.submit("echo three");
    assert_eq!(lab.ack(3)["position"], 1, "three waits behind two");
    let all = lab.finals(5);
    // After the second job, the health check goes before the job that was waiting.
    assert_eq!(
        shape(&all),
        [
            "hc:passed",
            "job:passed",
            "job:passed",
            "hc:passed",
            "job:passed"
        ],
        "{all:#?}"
    );
    assert!(all[1].get("health_check").is_none(), "{}", all[1]);
    assert_ne!(all[3]["id"], all[0]["id"]);
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_health_check_runs_every_interval_counted_from_the_end_of_the_last() {
    let lab = Lab::new("hc-every", "echo fine\n", "every = \"2s\"\n");
    let all = lab.finals(3);
    assert_eq!(
        shape(&all),
        ["hc:passed", "hc:passed", "hc:passed"],
        "{all:#?}"
    );
    for pair in all.windows(2) {
        let ended = pair[0]["ended_ms"].as_u64().unwrap();
        let queued = pair[1]["queued_ms"].as_u64().unwrap();
        let gap = queued.saturating_sub(ended);
        assert!(
            queued >= ended + 2000 && gap < 2000 + 1500,
            "queued {gap} ms after the last one ended: {pair:#?}"
        );
    }
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_failing_health_check_takes_the_sut_offline_until_a_person_puts_it_online() {
    let flag = tempfile::tempdir().unwrap();
    let healthy = flag.path().join("healthy");
    let script = format!(
        "if [ -e {0} ]; then echo healthy; else echo the board is sick; exit 3; fi\n",
        healthy.display()
    );
    let lab = Lab::new("hc-fail", &script, "after_jobs = 50\n");
    let failed = lab.finals(1);
    assert_eq!(shape(&failed), ["hc:failed"], "{failed:?}");
    let reason = format!(
        "health check {} failed: exit 3",
        failed[0]["id"].as_str().unwrap()
    );
    // Offline, with the reason, in the agent's status.
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["admin"]["mode"] == "offline" && json(m)["admin"]["reason"] == reason.as_str()
    });
    // A new job is refused, naming the health check.
    lab.submit("echo refused");
    let ack = lab.ack(1);
    assert_eq!(ack["result"], "rejected", "{ack}");
    assert!(ack["reason"].as_str().unwrap().contains(&reason), "{ack}");

    // A person repairs the board and puts it online: a health check runs first, then jobs run.
    std::fs::write(&healthy, "").unwrap();
    let out = lab.broker.publish(&lab.t("admin"), "online", &["-q", "1"]);
    assert!(out.status.success(), "{out:?}");
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["admin"]["mode"] == "online"
    });
    lab.submit("echo accepted");
    assert_eq!(lab.ack(2)["result"], "accepted", "{}", lab.ack(2));
    let all = lab.finals(3);
    assert_eq!(
        shape(&all),
        ["hc:failed", "hc:passed", "job:passed"],
        "{all:#?}"
    );
}

/// A health check that fails while the SUT is in maintenance leaves the maintenance as it is
/// (reason, who), and `online` starts the held device process again (it used to turn the
/// maintenance into offline, and `online` then left the device process held: online, idle,
/// healthy, with no device process).
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_health_check_failing_during_maintenance_keeps_it_and_online_restarts_the_device() {
    let flag = tempfile::tempdir().unwrap();
    let go = flag.path().join("go");
    let script = format!(
        "while [ ! -e {0} ]; do sleep 0.05; done; echo sick; exit 3\n",
        go.display()
    );
    let lab = Lab::with_device(
        "hc-maint",
        Some("while :; do sleep 0.1; done"),
        &script,
        "after_jobs = 50\n",
    );
    let alive = |want: bool| {
        lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
            json(m)["child"]["alive"] == want
        })
    };
    alive(true);
    lab.mqtt
        .wait(&lab.t("last_job"), LIMIT, |m| json(m)["state"] == "running");
    let out = lab
        .broker
        .publish(&lab.t("admin"), "maintenance reflash", &["-q", "1"]);
    assert!(out.status.success(), "{out:?}");
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["admin"]["mode"] == "maintenance" && json(m)["child"]["alive"] == false
    });
    std::fs::write(&go, "").unwrap();
    let failed = lab.finals(1);
    assert_eq!(shape(&failed), ["hc:failed"], "{failed:?}");
    // A status made a second after the end (the failure is handled on the loop's next pass,
    // within a heartbeat of 200 ms).
    let after = failed[0]["ended_ms"].as_u64().unwrap() + 1000;
    let st = json(&lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["time_ms"].as_u64().is_some_and(|t| t > after)
    }));
    assert_eq!(st["admin"]["mode"], "maintenance", "{st}");
    assert_eq!(st["admin"]["reason"], "reflash", "{st}");
    let out = lab.broker.publish(&lab.t("admin"), "online", &["-q", "1"]);
    assert!(out.status.success(), "{out:?}");
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["admin"]["mode"] == "online" && json(m)["child"]["alive"] == true
    });
}
