//! `.ci/run --setup-only` installs what the tests need the way a fresh Debian machine allows:
//! apt-get for the hosts and for Debian's python3-websockets and python3-requests, rustup for
//! rustfmt/clippy, a virtualenv when python3 is not Debian's. The machine is simulated: PATH
//! holds only fakes of the tools the script calls, which log their calls and "install" by
//! creating marker files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Machine {
    root: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn write_tool(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A Python that imports websockets and requests once `$marker` exists and creates virtualenvs
/// whose interpreter is the same fake with its own marker (set by `pip install websockets
/// requests`).
fn python_fake(log: &Path) -> String {
    format!(
        r#"here=$(/usr/bin/dirname "$0")
marker="$here/.websockets"; [ -n "${{WS_MARKER:-}}" ] && [ "$0" = "$PY_MAIN" ] && marker=$WS_MARKER
case "$1 $2" in
  "-c import websockets, requests") [ -e "$marker" ] ;;
  "-m venv") /bin/mkdir -p "$3/bin" && /bin/cp "$0" "$3/bin/python3" && echo "python3 -m venv" >> {log} ;;
  "-m pip") echo "pip ${{*:3}}" >> {log}; : > "$here/.websockets" ;;
  *) exit 3 ;;
esac"#,
        log = log.display()
    )
}

/// Builds the fake machine: `present` tools exist; cargo has fmt/clippy if `components`.
fn machine(name: &str, present: &[&str], components: bool) -> Machine {
    let root = std::env::temp_dir().join(format!("luna-ci-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = root.join("log");
    std::fs::write(&log, "").unwrap();
    for tool in ["dirname", "id"] {
        std::os::unix::fs::symlink(format!("/usr/bin/{tool}"), bin.join(tool)).unwrap();
    }
    for tool in present {
        write_tool(&bin, tool, "exit 0");
    }
    let l = log.display();
    let fmt = if components { "exit 0".to_string() } else { format!("[ -e {}/fmt ]", root.display()) };
    let clippy = if components { "exit 0".to_string() } else { format!("[ -e {}/clippy ]", root.display()) };
    write_tool(
        &bin,
        "cargo",
        &format!(r#"case "$1" in fmt) {fmt} ;; clippy) {clippy} ;; *) exit 3 ;; esac"#),
    );
    write_tool(
        &bin,
        "rustup",
        &format!(
            r#"echo "rustup $*" >> {l}; [ "$3" = rustfmt ] && : > {r}/fmt; [ "$3" = clippy ] && : > {r}/clippy; exit 0"#,
            r = root.display()
        ),
    );
    write_tool(
        &bin,
        "apt-get",
        &format!(
            r#"echo "apt-get $*" >> {l}
for p in "$@"; do [ "$p" = python3-requests ] && : > {r}/debian-websockets; done; exit 0"#,
            r = root.display()
        ),
    );
    write_tool(&bin, "sudo", r#""$@""#);
    Machine { root }
}

/// Runs `.ci/run --setup-only` on the machine; returns (success, tool log, stdout).
fn setup(m: &Machine, python_is_debian: bool) -> (bool, String, String) {
    let bin = m.root.join("bin");
    // python3 on PATH: Debian's (the path the script treats as Debian's) or another one (pyenv).
    let python = bin.join("python3");
    std::fs::write(&python, format!("#!/bin/bash\n{}\n", python_fake(&m.root.join("log")))).unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let debian = if python_is_debian { python.clone() } else { m.root.join("no-debian-python") };
    let out = Command::new("/bin/bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run"))
        .arg("--setup-only")
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", &m.root)
        .env("CARGO_TARGET_DIR", m.root.join("target"))
        .env("LUNA_DEBIAN_PYTHON", &debian)
        .env("LUNA_SBIN", &bin)
        .env("PY_MAIN", &python)
        .env("WS_MARKER", m.root.join("debian-websockets"))
        .output()
        .unwrap();
    let log = std::fs::read_to_string(m.root.join("log")).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || !stderr.is_empty(), "{stdout}\n{stderr}");
    (out.status.success(), log, format!("{stdout}{stderr}"))
}

#[test]
fn fresh_debian_gets_apt_packages_rustup_components_and_debian_websockets() {
    let m = machine("debian", &[], false);
    let (ok, log, out) = setup(&m, true);
    assert!(ok, "{out}\n{log}");
    assert!(
        log.contains(
            "apt-get install -y -qq --no-install-recommends luajit lua5.1 love openssl util-linux chromium curl nginx"
        ),
        "{log}"
    );
    assert!(
        log.contains("rustup component add rustfmt") && log.contains("rustup component add clippy"),
        "{log}"
    );
    assert!(
        log.contains("apt-get install -y -qq --no-install-recommends python3-websockets python3-requests"),
        "{log}"
    );
    assert!(!log.contains("pip"), "no pip into Debian's Python: {log}");
    assert!(
        out.contains(&format!("Python for the peer tests: {}", m.root.join("bin/python3").display())),
        "{out}"
    );
}

#[test]
fn a_python_that_is_not_debians_gets_a_virtualenv_under_target() {
    let m = machine(
        "pyenv",
        &["luajit", "lua5.1", "love", "openssl", "prlimit", "chromium", "curl", "nginx"],
        true,
    );
    let (ok, log, out) = setup(&m, false);
    assert!(ok, "{out}\n{log}");
    assert_eq!(
        log, "python3 -m venv\npip install --quiet websockets requests\n",
        "only the virtualenv is set up"
    );
    let venv = m.root.join("target/ci-venv/bin/python3");
    assert!(out.contains(&format!("Python for the peer tests: {}", venv.display())), "{out}");
    // Run again: everything is there now, nothing is installed twice.
    std::fs::write(m.root.join("log"), "").unwrap();
    let (ok, log, _) = setup(&m, false);
    assert!(ok);
    assert_eq!(log, "", "a second run installs nothing");
}

#[test]
fn missing_components_without_rustup_are_named() {
    let m = machine(
        "norustup",
        &["luajit", "lua5.1", "love", "openssl", "prlimit", "chromium", "curl", "nginx"],
        false,
    );
    std::fs::remove_file(m.root.join("bin/rustup")).unwrap();
    let (ok, _, out) = setup(&m, true);
    assert!(!ok);
    assert!(out.contains("cargo fmt is missing and there is no rustup to add it: install rustfmt"), "{out}");
}
