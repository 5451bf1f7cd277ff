//! Making sure of a SUT's image before its container is created.
//!
//! The image is used as is when it is present locally. Without `[build]`, an absent image is
//! pulled; when that fails (no registry reachable, unknown image) the action fails with
//! `image <name> is not present locally and could not be pulled: <reason>` and a hint, and the
//! SUT is retried with backoff like any failed action (the error is `last_error` on
//! `<sut>/supervisor`). With `[build]`, the image is built when it is absent or its
//! `io.labvisor.build-hash` label differs from the config's; since the config hash covers the
//! build context, a changed context also recreates the container.
//!
//! Build (and pull) output streams line by line to the supervisor's log (info level, field
//! `sut`) and to `<sut>/build` (QoS 0, not retained, plain text). The build runs inside that
//! SUT's action, so it takes one of the loop's parallel action slots and never holds up the
//! other SUTs.

use labvisor_mqtt::{Message, MqttLink};
use labvisor_protocol::config::SutConfig;
use labvisor_protocol::topics::Topics;
use tracing::info;

use super::{ContainerRuntime, ImageOutcome, RuntimeError};
use crate::spec::{image_spec, SpecContext};

/// Makes sure the image of `cfg` is there (present, pulled or built), streaming progress to
/// the log and, when `link` is given, to `<sut>/build`. Called in the supervisor's `action`
/// span, which names the SUT.
pub async fn ensure<R: ContainerRuntime>(
    runtime: &R,
    cfg: &SutConfig,
    ctx: &SpecContext,
    topics: &Topics,
    link: Option<&MqttLink>,
) -> Result<ImageOutcome, RuntimeError> {
    let spec = image_spec(cfg, ctx);
    let sut = cfg.name.clone();
    let topic = topics.build(&sut);
    let image = spec.image.clone();
    let link = link.cloned();
    let progress = move |line: &str| {
        info!(image = %image, "image: {line}");
        if let Some(link) = &link {
            // Best effort: a line that cannot be queued is only lost from the topic.
            let _ = link.publish_output(Message::stream(topic.clone(), line.to_owned()));
        }
    };
    let outcome = runtime.ensure_image(&spec, &progress).await?;
    match &outcome {
        ImageOutcome::Present => {}
        ImageOutcome::Pulled => {
            info!(image = %spec.image, "Pulled the image.")
        }
        ImageOutcome::Built(id) => {
            info!(image = %spec.image, id = %id, "Built the image.")
        }
    }
    Ok(outcome)
}
