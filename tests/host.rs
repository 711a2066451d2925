//! The standalone host (`luna-host`) as a user runs it: examples, exit rules, signals, errors.
#![cfg(feature = "vendored")]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luna-host"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

fn script(body: &str) -> tempfile_path::Path {
    tempfile_path::write(body)
}

/// A minimal temp-file helper (no extra dependency).
mod tempfile_path {
    use std::sync::atomic::{AtomicUsize, Ordering};
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(body: &str) -> Path {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("luna-host-test-{}-{}.lua", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, body).unwrap();
        Path(path)
    }
}

fn run(cmd: &mut Command) -> (Output, Duration) {
    let start = Instant::now();
    let out = cmd.output().unwrap();
    (out, start.elapsed())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn timers_example_runs_and_exits_on_close() {
    let (out, took) = run(host().arg("examples/timers.lua"));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["[worker] step 3", "heartbeat 4", "localhost resolves to 127.0.0.1", "closing"] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
    assert!(!text.contains("never prints"), "a cancelled timer fired:\n{text}");
    assert!(!text.contains("heartbeat 5"), "interval kept running after cancel:\n{text}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn update_runs_at_the_requested_rate_without_spinning() {
    let s = script(
        "local luna = require('luna')
         local frames, total = 0, 0
         function update(dt) frames = frames + 1; total = total + dt end
         luna.set_timeout(1, function()
           print(('frames=%d total=%.3f'):format(frames, total)); luna.close()
         end)",
    );
    let (out, _) = run(host().args(["--hz", "100"]).arg(&s.0));
    let text = stdout(&out);
    let frames: u32 =
        text.split("frames=").nth(1).and_then(|t| t.split(' ').next()).unwrap().parse().unwrap();
    assert!((80..=102).contains(&frames), "expected ~100 frames in 1 s at 100 Hz: {text}");
    // CPU time of an idle host over ~1 s: a spinning loop would use about a second.
    let s2 = script("local luna = require('luna'); function update() end; luna.set_timeout(1, luna.close)");
    let child = host().arg(&s2.0).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert!(ticks < 20, "idle host used {ticks} clock ticks (1/100 s) of CPU in 0.8 s");
}

#[test]
fn exits_when_nothing_is_pending_and_no_update_is_defined() {
    let s = script("print('hello from ' .. arg[0]:match('[^/]*$') .. ' ' .. tostring(...))");
    let (out, took) = run(host().arg(&s.0).arg("first-arg"));
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("hello from luna-host-test-"), "{}", stdout(&out));
    assert!(stdout(&out).contains("first-arg"));
    assert!(took < Duration::from_secs(2));
}

#[test]
fn os_exit_code_is_kept() {
    let s = script("require('luna').set_timeout(0.05, function() os.exit(3) end)");
    let (out, _) = run(host().arg(&s.0));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn script_errors_exit_nonzero_with_the_message() {
    let s = script("local luna = require('luna')\nluna.set_timeout(0.01, function() error('kaboom') end)");
    let (out, _) = run(host().arg(&s.0));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kaboom") && err.contains(":2:"), "{err}");

    let (out, _) = run(host().arg("/nonexistent/script.lua"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/script.lua"));

    let (out, _) = run(host().args(["--hz", "0", "x.lua"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hz"));
}

#[test]
fn help_and_version_exit_0_and_usage_errors_exit_2() {
    for flag in ["--help", "-h"] {
        let (out, _) = run(host().arg(flag));
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(stdout(&out).starts_with("usage: luna-host"), "{flag}: {}", stdout(&out));
        assert!(stdout(&out).contains("--version"), "the help lists --version");
    }
    for flag in ["--version", "-V"] {
        let (out, _) = run(host().arg(flag));
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert_eq!(stdout(&out), format!("luna-host {}\n", env!("CARGO_PKG_VERSION")), "{flag}");
    }
    for args in [&[][..], &["--frobnicate", "x.lua"], &["--hz"], &["--hz", "abc", "x.lua"]] {
        let (out, _) = run(host().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("usage: luna-host") || err.contains("--hz"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "usage errors go to stderr");
    }
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly_calling_quit() {
    for signal in ["TERM", "INT"] {
        let s = script(
            "local luna = require('luna')
             function update() end
             luna.set_interval(0.01, function() end)
             function quit() print('quit called') end
             print('ready')",
        );
        let mut child = host().arg(&s.0).stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 6];
        std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
        assert_eq!(&first, b"ready\n");
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(status.success());
        let start = Instant::now();
        let code = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(code.success(), "SIG{signal}: {code:?}");
        assert_eq!(rest, "quit called\n", "SIG{signal}");
        assert!(start.elapsed() < Duration::from_secs(2));
        let _ = std::io::stderr().flush();
    }
}

#[test]
fn examples_are_lua_scripts_and_benchmarks_live_in_benches() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(name.ends_with(".lua"), "examples/{name} is not a Lua example (benchmarks go to benches/)");
    }
}

#[test]
fn websocket_example_serves_others_with_serve() {
    let mut server = host()
        .args(["examples/ws_echo.lua", "--serve"])
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap()));
    let port = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        if let Some(rest) = line.strip_prefix("server: listening on ws://127.0.0.1:") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    // Another process connects, as the example's comment suggests, after a while.
    std::thread::sleep(Duration::from_millis(300));
    let client = script(&format!(
        "local lunac = require('lunac')
         lunac.connect_to_web_app({{ name = 'other', url = 'ws://127.0.0.1:{port}/', debug = false,
           on_connect = function(self) self:send('from elsewhere') end,
           on_message = function(self, m) print(m); self:close() end,
           on_close = function() lunac.close() end }})"
    ));
    let (out, _) = run(host().arg(&client.0));
    assert_eq!(stdout(&out), "echo: from elsewhere\n", "{}", String::from_utf8_lossy(&out.stderr));
    let status = Command::new("kill").arg(server.id().to_string()).status().unwrap();
    assert!(status.success());
    assert!(server.wait().unwrap().success(), "SIGTERM stops --serve cleanly");
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(rest.iter().any(|l| l.contains("connected")), "the server saw the client: {rest:?}");
}

#[test]
fn websocket_example_talks_to_itself_and_exits() {
    let (out, took) = run(host().arg("examples/ws_echo.lua"));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["client: echo: hello", "client: echo: message 2", "client: closed (1000 App closing)"] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// Starts an example with `PORT=0` and returns it with the port it printed after `prefix`.
fn serve_example(args: &[&str], prefix: &str) -> (std::process::Child, u16, impl Iterator<Item = String>) {
    let mut server = host().args(args).env("PORT", "0").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap())).map(Result::unwrap);
    let port = loop {
        let line = lines.next().expect("the example printed its address");
        if let Some(rest) = line.split(prefix).nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break digits.parse().unwrap();
        }
    };
    (server, port, lines)
}

#[test]
fn tcp_chat_example_relays_lines_between_netcat_like_clients() {
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream;
    let (mut server, port, _lines) = serve_example(&["examples/tcp_chat.lua"], "]:");
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reader = BufReader::new(s.try_clone().unwrap());
        (s, reader)
    };
    let line = |r: &mut BufReader<TcpStream>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    };
    let (mut alice, mut alice_in) = connect();
    assert!(line(&mut alice_in).starts_with("welcome to the chat"));
    let (_bob, mut bob_in) = connect();
    assert!(line(&mut bob_in).contains("(2 here)"));
    assert!(line(&mut alice_in).ends_with("joined\n"));
    alice.write_all(b"/nick alice\r\nhello bob\n").unwrap();
    assert!(line(&mut bob_in).ends_with("is now alice\n"));
    assert_eq!(line(&mut bob_in), "<alice> hello bob\n");
    alice.write_all(b"/quit\n").unwrap();
    assert_eq!(line(&mut alice_in), "bye\n");
    assert_eq!(line(&mut bob_in), "* alice left\n");
    Command::new("kill").arg(server.id().to_string()).status().unwrap();
    assert!(server.wait().unwrap().success(), "SIGTERM stops the chat cleanly");
}

#[test]
fn udp_echo_example_pings_itself_and_serves_others() {
    let (out, took) = run(host().arg("examples/udp_echo.lua"));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("client: ping 3 in"), "{text}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let (mut server, port, _lines) = serve_example(&["examples/udp_echo.lua", "--serve"], "127.0.0.1:");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    socket.send_to(b"from nc", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from nc");
    Command::new("kill").arg(server.id().to_string()).status().unwrap();
    assert!(server.wait().unwrap().success());
}

#[test]
fn http_app_example_answers_routes_and_chats() {
    let (out, took) = run(host().arg("examples/http_app.lua"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[0].starts_with("Server listening on http://127.0.0.1:"), "{text}");
    assert_eq!(lines[1], r#"201 {"saved":"ada"}"#);
    assert!(
        lines[2].starts_with("200 {")
            && lines[2].contains(r#""points":7"#)
            && lines[2].contains(r#""name":"ada""#),
        "{text}"
    );
    assert_eq!(lines[3], "405 Method Not Allowed");
    assert!(
        lines[4].starts_with("200 {")
            && lines[4].contains(r#""bytes":100000"#)
            && lines[4].contains(r#""title":"replay""#),
        "{text}"
    );
    assert_eq!(lines[5], "chat: hello from Lua");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn http_example_asks_itself_and_serves_others() {
    use std::io::Read;
    use std::net::TcpStream;
    let (out, took) = run(host().arg("examples/http_hello.lua"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "HTTP/1.1 200 OK / Hello, Luna!\n");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (mut server, port, _lines) = serve_example(&["examples/http_hello.lua", "--serve"], "127.0.0.1:");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /hello?name=curl%21 HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.contains("\r\n\r\nHello, curl!!HTTP/1.1 404"),
        "{reply}"
    );
    assert!(reply.ends_with("no page at /nope"), "{reply}");
    Command::new("kill").arg(server.id().to_string()).status().unwrap();
    assert!(server.wait().unwrap().success(), "SIGTERM stops --serve cleanly");
}

#[test]
fn http_download_example_saves_with_progress_while_a_timer_ticks() {
    let (out, took) = run(host().arg("examples/http_download.lua"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(
        text.matches(" KiB of 8192 KiB (").count() > 10 && text.contains("8192 KiB of 8192 KiB (100%)"),
        "{text}"
    );
    let last = text.lines().last().unwrap();
    let ticks: u32 =
        last.split("ticked ").nth(1).and_then(|t| t.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(last.starts_with("saved ") && last.contains("status 200"), "{text}");
    // 32 pieces 20 ms apart: a timer every 10 ms ticks throughout (the frame never blocked).
    assert!(ticks >= 30, "the timer ticked {ticks} times: {text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn http_json_example_posts_and_reads_the_leaderboard() {
    let (out, _) = run(host().arg("examples/http_json.lua"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "ada is ranked 1 of the scores sent",
            "bob is ranked 2 of the scores sent",
            "1. bob 45",
            "2. ada 30"
        ],
        "{text}"
    );
}

#[test]
fn http_proxy_comes_from_the_environment_unless_no_proxy_names_the_host() {
    // (lower-case http_proxy, as curl reads it; an empty no_proxy does not hide NO_PROXY)
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = script(&format!(
        r#"local luna = require("luna")
        local proxy = luna.tcp.listen{{ host = "127.0.0.1", port = {port}, on_connection = function(s)
          local head = s:read_until("\r\n\r\n")
          local line = head:match("^[^\r]+")
          s:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #line .. "\r\n\r\n" .. line)
        end }}
        local origin = luna.serve({{ port = 0, host = "127.0.0.1", handleRequest = function() return "direct" end }})
        luna.spawn(function()
          print(luna.http.request("http://example.invalid/via").body)
          print(luna.http.request(origin.address .. "/skip").body)
          print(luna.http.request({{ url = "http://example.invalid/x", proxy = false }}) == nil)
          proxy:close(); origin:stop(); luna.close()
        end)"#
    ));
    let (out, _) = run(host()
        .arg(&s.0)
        .env("http_proxy", format!("127.0.0.1:{port}"))
        .env("no_proxy", "")
        .env("NO_PROXY", "localhost, .skip.test,127.0.0.1:80,[::1]")
        .env_remove("HTTP_PROXY"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "GET http://example.invalid/via HTTP/1.1\ndirect\ntrue\n");
}
