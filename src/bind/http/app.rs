//! What `lua/http_app.lua` (`luna.new_http_app`) asks of Rust: finding files under a static
//! root without escaping it, cookies, forms and MIME types. The app itself
//! (routes, groups, middleware, templates) is Lua on `luna.serve`'s engine.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use cookie::time::{Duration, OffsetDateTime};
use cookie::{Cookie, SameSite};
use mlua::{Lua, MultiValue, Result, Table, Value};

use crate::bind::error::misuse;
use crate::bind::options::Options;

/// A file found under a static root: the path it was found at, its metadata, and the file
/// itself when resolving opened it (the answer sends from it instead of opening it again).
pub(crate) type Found = (PathBuf, fs::Metadata, Option<fs::File>);

/// The file of URL path `path` (percent-encoded, as sent) under directory `root` (canonical:
/// see [`canonical`]; `root_dir` the same directory, open): a regular file (a directory's
/// `index.html`) inside `root`, symlinks followed only while they stay inside, or why not.
/// Decoded NUL bytes, backslashes and `..` segments are refused before the disk is asked;
/// names starting with a dot are not found unless `dotfiles`.
fn resolve(
    root: &Path,
    root_dir: Option<&fs::File>,
    path: &[u8],
    dotfiles: bool,
) -> std::result::Result<Found, &'static str> {
    let decoded: Vec<u8> = percent_encoding::percent_decode(path).collect();
    let decoded = std::str::from_utf8(&decoded).map_err(|_| "forbidden")?;
    if decoded.contains(['\0', '\\']) {
        return Err("forbidden");
    }
    let mut relative = PathBuf::new();
    for part in decoded.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part.starts_with('.') && part != ".." && !dotfiles {
            return Err("not found"); // `.env`, `.git`: not served unless asked for
        }
        match Path::new(part).components().next() {
            Some(Component::Normal(_)) => relative.push(part),
            _ => return Err("forbidden"),
        }
    }
    if let Some(found) = root_dir.and_then(|dir| open_beneath(root, dir, relative.clone())) {
        return found;
    }
    let mut full = fs::canonicalize(root.join(&relative)).map_err(|_| "not found")?;
    let mut meta = fs::metadata(&full).map_err(|_| "not found")?;
    if meta.is_dir() {
        full = fs::canonicalize(full.join("index.html")).map_err(|_| "not found")?;
        meta = fs::metadata(&full).map_err(|_| "not found")?;
    }
    if !full.starts_with(root) {
        return Err("forbidden");
    }
    if !meta.is_file() {
        return Err("not found");
    }
    Ok((full, meta, None))
}

/// [`resolve`] by the kernel: `openat2` with `RESOLVE_BENEATH` refuses any `..`, absolute
/// symlink or symlink that leads out of `dir`, in the one call that opens the file (nothing can
/// be swapped between a check and the open). `None` where the kernel has no `openat2` (before
/// Linux 5.6), for the portable path.
fn open_beneath(
    root: &Path,
    dir: &fs::File,
    mut relative: PathBuf,
) -> Option<std::result::Result<Found, &'static str>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let open = |relative: &Path| -> std::result::Result<Option<fs::File>, &'static str> {
        let name = if relative.as_os_str().is_empty() { Path::new(".") } else { relative };
        let name = std::ffi::CString::new(name.as_os_str().as_bytes()).map_err(|_| "forbidden")?;
        // Not constructible as a literal (non-exhaustive): zeroed, then the fields we set.
        // SAFETY: `open_how` is plain integers, for which zero is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // Non-blocking: a FIFO must not hold the event loop (it is refused after the fstat);
        // no controlling terminal from a tty.
        how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: a valid directory fd, a NUL-terminated path and `how` of the size we say.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd that nothing else owns.
            return Ok(Some(unsafe { fs::File::from_raw_fd(fd as i32) }));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            // No openat2 (old kernel, or a seccomp filter that refuses it), or a path it will
            // not follow (an absolute symlink, which may still point inside): the portable
            // check decides.
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG | libc::EXDEV | libc::ELOOP) => {
                Ok(None)
            }
            _ => Err("not found"),
        }
    };
    let found = (|| {
        let Some(mut file) = open(&relative)? else { return Ok(None) };
        let mut meta = file.metadata().map_err(|_| "not found")?;
        if meta.is_dir() {
            relative.push("index.html");
            file = open(&relative)?.ok_or("not found")?;
            meta = file.metadata().map_err(|_| "not found")?;
        }
        if !meta.is_file() {
            return Err("not found");
        }
        Ok(Some((root.join(&relative), meta, Some(file))))
    })();
    found.transpose()
}

/// `core.canonical(dir)` → `dir` with symlinks resolved (what [`resolve`] takes as its root), or
/// nil while it does not exist.
fn canonical(lua: &Lua, dir: mlua::String) -> Result<Option<mlua::String>> {
    match fs::canonicalize(&*dir.to_str()?) {
        Ok(p) => Ok(Some(lua.create_string(p.as_os_str().as_encoded_bytes())?)),
        Err(_) => Ok(None),
    }
}

/// `core.file(root, path, dotfiles)` (`root` canonical) → `path, size, mtime` (seconds since
/// the epoch), or `nil, "not found" | "forbidden"`. The file it opened waits for the answer
/// that sends it (see [`super::take_opened`]).
fn file(lua: &Lua, (root, path, dotfiles): (mlua::String, mlua::String, bool)) -> Result<MultiValue> {
    let root = PathBuf::from(root.to_str()?.to_string());
    let rt = super::runtime(lua)?;
    let dir = super::root_dir(&rt, &root);
    match resolve(&root, dir.as_deref(), &path.as_bytes(), dotfiles) {
        Ok((p, meta, opened)) => {
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
            let name = lua.create_string(p.as_os_str().as_encoded_bytes())?;
            super::keep_opened(&rt, p, opened);
            // Integers, so Lua 5.4 shows them without a fraction.
            let size = meta.len() as i64;
            let mtime = mtime.map_or(0, |d| d.as_secs() as i64);
            Ok(MultiValue::from_iter([Value::String(name), Value::Integer(size), Value::Integer(mtime)]))
        }
        Err(why) => Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(why)?)])),
    }
}

/// `core.is_file(path)` → whether `path` is a regular file (following symlinks).
fn is_file(_: &Lua, path: mlua::String) -> Result<bool> {
    Ok(Path::new(&*path.to_str()?).is_file())
}

/// `core.cookies(header)` → name → value of a `Cookie` header (values percent-decoded; the
/// first of a repeated name wins, as the most specific is sent first; malformed pairs skipped).
fn cookies(lua: &Lua, header: mlua::String) -> Result<Table> {
    let t = lua.create_table()?;
    let header = header.to_string_lossy();
    for c in Cookie::split_parse_encoded(header.as_str()).flatten() {
        if t.raw_get::<Value>(c.name())?.is_nil() {
            t.raw_set(c.name(), c.value())?;
        }
    }
    Ok(t)
}

const SET_COOKIE: &str = "res:cookie(name, value, options)";

/// `core.set_cookie(name, value, options)` → a `Set-Cookie` value (name and value
/// percent-encoded). Options: `path`, `domain`, `max_age` (seconds), `expires` (seconds since the
/// epoch), `secure`, `http_only`, `same_site` (`"Strict"`, `"Lax"`, `"None"`), `partitioned`.
fn set_cookie(lua: &Lua, (name, value, options): (String, String, Value)) -> Result<String> {
    if name.is_empty() {
        return Err(misuse(SET_COOKIE, "'name' must not be empty"));
    }
    let keys = ["path", "domain", "max_age", "expires", "secure", "http_only", "same_site", "partitioned"];
    let opts = Options::optional(lua, SET_COOKIE, options, &keys)?;
    let mut c = Cookie::new(name, value);
    if let Some(path) = opts.string("path")? {
        c.set_path(path);
    }
    if let Some(domain) = opts.string("domain")? {
        c.set_domain(domain);
    }
    if let Some(secs) = opts.number("max_age")? {
        c.set_max_age(Duration::seconds(secs as i64));
    }
    if let Some(at) = opts.number("expires")? {
        let at = OffsetDateTime::from_unix_timestamp(at as i64)
            .map_err(|e| misuse(SET_COOKIE, format!("'expires' is out of range: {e}")))?;
        c.set_expires(at);
    }
    c.set_secure(opts.boolean("secure")?);
    c.set_http_only(opts.boolean("http_only")?);
    c.set_partitioned(opts.boolean("partitioned")?);
    if let Some(s) = opts.string("same_site")? {
        let same_site = match s.to_ascii_lowercase().as_str() {
            "strict" => SameSite::Strict,
            "lax" => SameSite::Lax,
            "none" => SameSite::None,
            _ => {
                return Err(misuse(
                    SET_COOKIE,
                    format!("'same_site' must be \"Strict\", \"Lax\" or \"None\", got \"{s}\""),
                ))
            }
        };
        c.set_same_site(same_site);
    }
    Ok(c.encoded().to_string())
}

/// `core.form(text)` → the pairs of a urlencoded form or query (decoded; the last of a
/// repeated name wins).
fn form(lua: &Lua, text: mlua::String) -> Result<Table> {
    Ok(super::form_table(lua, &text.as_bytes())?.unwrap_or(lua.create_table()?))
}

/// `core.mime(path)` → the MIME type its extension suggests, or nil.
fn mime(_: &Lua, path: String) -> Result<Option<String>> {
    Ok(mime_guess::from_path(path).first_raw().map(str::to_owned))
}

/// `core.http_date(seconds)` → an HTTP date (`Last-Modified`).
fn http_date(_: &Lua, secs: f64) -> Result<String> {
    let at = UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0.0) as u64);
    Ok(httpdate::fmt_http_date(at))
}

/// `core.parse_http_date(text)` → seconds since the epoch, or nil for a malformed date.
fn parse_http_date(_: &Lua, text: String) -> Result<Option<i64>> {
    let at = httpdate::parse_http_date(&text).ok();
    Ok(at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs() as i64))
}

/// `core.gzip(data)` → `data` gzip-compressed.
fn gzip(lua: &Lua, data: mlua::String) -> Result<mlua::String> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&data.as_bytes()).map_err(mlua::Error::external)?;
    lua.create_string(encoder.finish().map_err(mlua::Error::external)?)
}

/// `core.form_lists(text)` → name → every value of a urlencoded form or query, in order.
fn form_lists(lua: &Lua, text: mlua::String) -> Result<Table> {
    let t = lua.create_table()?;
    for (k, v) in form_urlencoded::parse(&text.as_bytes()) {
        let list = match t.raw_get::<Option<Table>>(k.as_ref())? {
            Some(list) => list,
            None => {
                let list = lua.create_table()?;
                t.raw_set(k.as_ref(), &list)?;
                list
            }
        };
        list.raw_push(v.as_ref())?;
    }
    Ok(t)
}

/// The helpers, for `lua/http_app.lua`.
pub(crate) fn core(lua: &Lua) -> Result<Table> {
    let core = lua.create_table()?;
    core.set("file", lua.create_function(file)?)?;
    core.set("is_file", lua.create_function(is_file)?)?;
    core.set("canonical", lua.create_function(canonical)?)?;
    core.set("cookies", lua.create_function(cookies)?)?;
    core.set("set_cookie", lua.create_function(set_cookie)?)?;
    core.set("form", lua.create_function(form)?)?;
    core.set("mime", lua.create_function(mime)?)?;
    core.set("gzip", lua.create_function(gzip)?)?;
    core.set("form_lists", lua.create_function(form_lists)?)?;
    core.set("http_date", lua.create_function(http_date)?)?;
    core.set("parse_http_date", lua.create_function(parse_http_date)?)?;
    super::streamed::register(lua, &core)?;
    super::body::register(lua, &core)?;
    super::multipart::register(lua, &core)?;
    Ok(core)
}

#[cfg(test)]
mod tests {
    use super::resolve;
    use std::fs;

    #[test]
    fn the_kernel_keeps_resolution_beneath_the_root() {
        let base = std::env::temp_dir().join(format!("luna-resolve-{}", std::process::id()));
        let root = base.join("root");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(base.join("secret"), "SECRET").unwrap();
        fs::write(root.join("sub/index.html"), "home").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub/index.html", root.join("in")).unwrap();
        let root = fs::canonicalize(&root).unwrap();
        std::os::unix::fs::symlink(root.join("sub/index.html"), root.join("abs_in")).unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dir = fs::File::open(&root).unwrap();
        for (dir, how) in [(Some(&dir), "openat2"), (None, "canonicalize")] {
            let (path, meta, opened) = resolve(&root, dir, b"/sub/", false).unwrap();
            assert_eq!(meta.len(), 4, "{how}: a directory's index.html");
            assert!(path.ends_with("index.html"), "{how}: {path:?}");
            assert_eq!(opened.is_some(), dir.is_some(), "{how}: opened in the same call");
            assert!(resolve(&root, dir, b"/in", false).is_ok(), "{how}: a link that stays inside");
            assert!(resolve(&root, dir, b"/abs_in", false).is_ok(), "{how}: an absolute one too");
            assert_eq!(
                resolve(&root, dir, b"/fifo", false).err(),
                Some("not found"),
                "{how}: no wait on a FIFO"
            );
            for attack in [&b"/out"[..], b"/abs", b"/../secret", b"/sub/%2e%2e/%2e%2e/secret"] {
                assert!(resolve(&root, dir, attack, false).is_err(), "{how}: {attack:?}");
            }
            assert_eq!(resolve(&root, dir, b"/nope", false).err(), Some("not found"));
        }
        fs::remove_dir_all(&base).unwrap();
    }
}
