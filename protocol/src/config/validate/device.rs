//! `[device]`: how labvisor learns that the device process is busy with work it did not start
//! (`busy_glob`), and how it asks the device to finish that work and take no more
//! (`drain_signal`).

use super::super::raw::RawDevice;
use super::super::{BusyGlob, DeviceSettings, DrainSignal};
use super::checker::{kk, Checker};

/// `[device]`; empty settings when the section is absent. Every problem names its key.
pub(super) fn device(
    c: &mut Checker<'_>,
    raw: Option<&RawDevice>,
    has_command: bool,
) -> DeviceSettings {
    let Some(raw) = raw else {
        return DeviceSettings::default();
    };
    let mut busy_glob = Vec::new();
    for (i, pattern) in raw.busy_glob.iter().enumerate() {
        match BusyGlob::new(pattern) {
            Ok(g) => busy_glob.push(g),
            Err(why) => c.add(&kk("device", "busy_glob").index(i), why),
        }
    }
    let drain_signal = raw.drain_signal.as_deref().and_then(|name| {
        let sig = DrainSignal::parse(name);
        if sig.is_none() {
            let names: Vec<&str> = DrainSignal::ALL.iter().map(|s| s.as_str()).collect();
            c.add(
                &kk("device", "drain_signal"),
                format!(
                    "{name:?} is not a signal that asks the device process to drain; one of {}",
                    names.join(", ")
                ),
            );
        } else if !has_command {
            c.add(
                &kk("device", "drain_signal"),
                "needs `command`: the signal goes to the device process, and this SUT has none",
            );
        }
        sig
    });
    DeviceSettings {
        busy_glob,
        drain_signal,
    }
}
