//! Images against a real Docker engine: `[build]` builds (and rebuilds on a context change)
//! with progress on the log and `<sut>/build`; an absent image that cannot be pulled (there is
//! no registry here) and a failing build are clear, retried errors that leave the other SUTs
//! alone; an image removed behind the supervisor's back is looked up again; an image with a
//! non-root `USER` runs a healthy agent.
//!
//! Each test runs its own supervisor with a unique `--id`, `--name-prefix` and
//! `--extra-label` (its [`DockerScope`]); built images carry the extra label, so the scope
//! removes them with the containers, volumes and networks.

use std::time::Duration;

mod common;

use common::{fast_sut, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker_ok, ensure_busybox_image, wait_until, DockerScope, Mosquitto, Subscriber, BUSYBOX_IMAGE,
};

/// Waits for a view of `sut` whose `last_error` contains every one of `parts`.
fn wait_error(sub: &Subscriber, sut: &str, parts: &[&str]) -> String {
    wait_until(&format!("{sut}'s last_error with {parts:?}"), T, || {
        views(sub, sut)
            .into_iter()
            .filter_map(|v| v.last_error)
            .find(|e| parts.iter().all(|p| e.contains(p)))
    })
}

/// Scope-labelled images: ids.
fn scope_images(scope: &DockerScope) -> Vec<String> {
    docker_ok(&[
        "image",
        "ls",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label={}", scope.label()),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Failed actions for `sut` in the supervisor log (each is retried with backoff).
fn failures(sup: &Sup, sut: &str) -> usize {
    sup.log()
        .lines()
        .filter(|l| l.contains("Action failed; will retry.") && l.contains(&format!("sut={sut}")))
        .count()
}

const T: Duration = Duration::from_secs(60);

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn build_section_builds_streams_progress_and_rebuilds_on_context_change() {
    ensure_busybox_image();
    let scope = DockerScope::new("build");
    let broker = Mosquitto::start();
    let build_sub = broker.subscribe("+/build", &[]);
    let (_t, dir) = tmp_sut_dir();
    let ctx = dir.join("img-a");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX_IMAGE}\nARG FLAVOUR\nCOPY marker.txt /marker.txt\nRUN echo \"built-$FLAVOUR\" > /built && echo build-step-output-line\n"
        ),
    )
    .unwrap();
    std::fs::write(ctx.join("marker.txt"), "v1\n").unwrap();
    let image = format!("{}:a", scope.name("img"));
    write(
        &dir,
        "a.toml",
        &fast_sut(
            &image,
            "[build]\ncontext = \"img-a\"\nargs = { FLAVOUR = \"tasty\" }\n",
        ),
    );
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);

    // Built, then run from the built image.
    let a1 = wait_healthy(&scope, "a", T);
    assert_eq!(docker_ok(&["exec", &a1, "cat", "/marker.txt"]), "v1");
    assert_eq!(docker_ok(&["exec", &a1, "cat", "/built"]), "built-tasty");
    assert_eq!(
        docker_ok(&["inspect", "--format", "{{.Config.Image}}", &a1]),
        image
    );
    let labels = |img: &str, key: &str| {
        docker_ok(&[
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
            img,
        ])
    };
    assert_eq!(labels(&image, "io.labvisor.managed-by"), "labvisor");
    assert_eq!(labels(&image, "io.labvisor.sut"), "a");
    assert_eq!(labels(&image, "io.labvisor.build-hash").len(), 64);
    assert_eq!(
        labels(&image, labvisor_tests::TEST_LABEL),
        scope.run_id(),
        "built images carry the --extra-label"
    );
    let hash1 = labels(&image, "io.labvisor.build-hash");

    // Progress: on <sut>/build and in the log, with the sut field.
    build_sub.wait_for("the FROM step on a/build", T, |l| {
        l.starts_with("a/build ") && l.contains(&format!(": FROM {BUSYBOX_IMAGE}"))
    });
    build_sub.wait_for("the RUN step's output on a/build", T, |l| {
        l == "a/build build-step-output-line"
    });
    let log = sup.log();
    assert!(
        log.lines()
            .any(|l| l.contains("build-step-output-line") && l.contains("sut=a")),
        "build output in the supervisor log:\n{log}"
    );
    assert_eq!(scope_images(&scope).len(), 1);

    // A context change: rebuilt (new build hash) and recreated (new container id).
    std::fs::write(ctx.join("marker.txt"), "v2\n").unwrap();
    let a2 = wait_until("a recreated from the rebuilt image", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("a"))?;
        (id != a1 && status.starts_with("Up")).then_some(id)
    });
    assert_eq!(docker_ok(&["exec", &a2, "cat", "/marker.txt"]), "v2");
    let hash2 = labels(&image, "io.labvisor.build-hash");
    assert_ne!(hash1, hash2);
    // The superseded image was removed: still one image of this scope.
    assert_eq!(scope_images(&scope).len(), 1);

    // Unchanged context: a supervisor restart adopts, no rebuild, same container.
    drop(sup);
    let builds_before = build_sub.lines().len();
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    wait_until("the restarted supervisor to take up a", T, || {
        sup.log().contains("Supervising.").then_some(())
    });
    let b = {
        write(&dir, "b.toml", &fast_sut(BUSYBOX_IMAGE, ""));
        wait_healthy(&scope, "b", T)
    };
    assert!(!b.is_empty());
    assert_eq!(ps(&scope)[&scope.name("a")].0, a2, "a was left alone");
    assert_eq!(build_sub.lines().len(), builds_before, "no rebuild");
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_absent_image_that_cannot_be_pulled_is_a_clear_error_and_others_run() {
    ensure_busybox_image();
    let scope = DockerScope::new("pull");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(
        &dir,
        "a.toml",
        &fast_sut("no-such-registry.invalid/nothing:1", ""),
    );
    write(&dir, "b.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);

    wait_healthy(&scope, "b", T);
    let e = wait_error(
        &sub,
        "a",
        &[
            "image no-such-registry.invalid/nothing:1 is not present locally and could not be pulled: ",
            "add a [build] section",
        ],
    );
    assert!(e.contains("no-such-registry.invalid"), "{e}");
    // Retried with backoff, and still no container.
    wait_until("a second attempt", T, || {
        (failures(&sup, "a") >= 2).then_some(())
    });
    assert!(!ps(&scope).contains_key(&scope.name("a")));
    assert!(ps(&scope)[&scope.name("b")].1.ends_with("(healthy)"));
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_failing_build_is_a_clear_retried_error_and_others_run() {
    ensure_busybox_image();
    let scope = DockerScope::new("badbuild");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let build_sub = broker.subscribe("c/build", &[]);
    let (_t, dir) = tmp_sut_dir();
    let ctx = dir.join("img-c");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BUSYBOX_IMAGE}\nRUN echo doomed-step-output && false\n"),
    )
    .unwrap();
    let image = format!("{}:c", scope.name("img"));
    write(
        &dir,
        "c.toml",
        &fast_sut(&image, "[build]\ncontext = \"img-c\"\n"),
    );
    write(&dir, "b.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);

    wait_healthy(&scope, "b", T);
    let e = wait_error(
        &sub,
        "c",
        &[
            &format!("building image {image} failed: "),
            "returned a non-zero code: 1",
            "doomed-step-output",
        ],
    );
    assert!(e.contains("RUN echo doomed-step-output && false"), "{e}");
    // Retried with backoff: the build ran again.
    wait_until("a second build attempt", T, || {
        let steps = build_sub
            .lines()
            .iter()
            .filter(|l| l.contains(": RUN echo doomed-step-output"))
            .count();
        (steps >= 2 && failures(&sup, "c") >= 2).then_some(())
    });
    assert!(!ps(&scope).contains_key(&scope.name("c")));
    assert!(ps(&scope)[&scope.name("b")].1.ends_with("(healthy)"));
    assert!(
        scope_images(&scope).is_empty(),
        "no image from a failed build"
    );

    // Fixed: built and running.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BUSYBOX_IMAGE}\nRUN echo fixed > /fixed\n"),
    )
    .unwrap();
    let c = wait_healthy(&scope, "c", T);
    assert_eq!(docker_ok(&["exec", &c, "cat", "/fixed"]), "fixed");
}

/// An image whose `USER` is not root (and which owns `/labvisor/data`, as the README asks):
/// the agent runs as that user, writes its heartbeat on the `/labvisor/run` tmpfs and its log
/// on the volume, and is healthy; with the SUT file inline and, after an edit that adds
/// `files`, uploaded.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_image_with_a_non_root_user_runs_a_healthy_agent() {
    ensure_busybox_image();
    let scope = DockerScope::new("nonroot");
    let (_t, dir) = tmp_sut_dir();
    let ctx = dir.join("img-u");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX_IMAGE}\nRUN mkdir -p /labvisor/data && chown 4242:4242 /labvisor/data\nUSER 4242:4242\n"
        ),
    )
    .unwrap();
    let image = format!("{}:u", scope.name("img"));
    let body = |files: &str| fast_sut(&image, &format!("[build]\ncontext = \"img-u\"\n{files}"));
    write(&dir, "u.toml", &body(""));
    let _sup = Sup::start(&scope, &dir, None, &[]);

    let check = |id: &str| {
        assert_eq!(docker_ok(&["exec", id, "id", "-u"]), "4242");
        assert_eq!(
            docker_ok(&[
                "exec",
                id,
                "stat",
                "-c",
                "%u",
                "/labvisor/run/heartbeat",
                "/labvisor/data/log/u.log"
            ]),
            "4242\n4242"
        );
    };
    let u1 = wait_healthy(&scope, "u", T);
    check(&u1);
    assert!(
        docker_ok(&["exec", &u1, "sh", "-c", "echo \"$LABVISOR_CONFIG_TOML\""]).contains("img-u")
    );

    // `files` at the top level (before the tables): now uploaded, root-owned but readable.
    write(&dir, "u.yaml", "k: v\n");
    write(
        &dir,
        "u.toml",
        &body("").replacen("[health]", "files = [\"u.yaml\"]\n[health]", 1),
    );
    let u2 = wait_until("u recreated and healthy", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("u"))?;
        (id != u1 && status.ends_with("(healthy)")).then_some(id)
    });
    check(&u2);
    assert_eq!(
        docker_ok(&["exec", &u2, "cat", "/labvisor/sut/u.yaml"]),
        "k: v"
    );
}

/// The supervisor remembers images it saw present (no inspect per container). An image
/// removed behind its back must be forgotten: the create that fails on it resets what is
/// remembered, so the retry inspects again and says the image is neither local nor pullable
/// (not the engine's bare "No such image" on every retry), and the SUT comes back once the
/// image is there again.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_image_removed_behind_the_supervisors_back_is_looked_up_again() {
    ensure_busybox_image();
    let scope = DockerScope::new("imggone");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    let ctx = dir.parent().unwrap().join("img-ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {BUSYBOX_IMAGE}\n")).unwrap();
    let image = scope.build_image(&ctx, "img");
    let body = |marker: &str| fast_sut(&image, &format!("[env]\nMARKER = \"{marker}\"\n"));
    write(&dir, "a.toml", &body("1"));
    let _sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    let a1 = wait_healthy(&scope, "a", T);

    // Untagged behind the supervisor's back; the running container keeps its image by id.
    docker_ok(&["rmi", "-f", &image]);
    write(&dir, "a.toml", &body("2"));
    let e = wait_error(
        &sub,
        "a",
        &[&format!(
            "image {image} is not present locally and could not be pulled"
        )],
    );
    assert!(e.contains("add a [build] section"), "{e}");

    // Back: the retry creates the container from it.
    scope.build_image(&ctx, "img");
    let a2 = wait_until("a recreated from the image once it is back", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("a"))?;
        (id != a1 && status.ends_with("(healthy)")).then_some(id)
    });
    assert_eq!(
        docker_ok(&["inspect", "--format", "{{.Config.Image}}", &a2]),
        image
    );
}
