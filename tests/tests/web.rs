//! The web page at `/`, driven in Debian's real Chromium (headless, through
//! chromedriver and the W3C WebDriver protocol) against a collector holding
//! two loghub samples and a few hostile lines: sign-in, search totals that
//! equal the API's, query errors, log text that stays text (an `<img
//! onerror>` payload and an ANSI escape), histogram zoom, context and the
//! live tail. A screenshot of the final page lands in
//! `target/web-test/page.png`.
//!
//! Without chromedriver the test is skipped, except under `CI=true`, where
//! it fails: `tests/run` installs `chromium` and `chromium-driver`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;
use serde_json::{Value, json};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Each wait on the page; generous for a loaded 2-core machine.
const PAGE_WAIT: Duration = Duration::from_secs(20);
/// W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The Enter key, as WebDriver's send-keys spells it.
const ENTER: &str = "\u{E007}";

/// An error answer of the WebDriver server: its `error` code and message
/// (or `io` when the request itself failed).
#[derive(Debug)]
struct WebDriverError {
    error: String,
    message: String,
}

/// One blocking request to a loopback HTTP/1.1 server; returns the status
/// and JSON body. chromedriver keeps the connection open despite
/// `Connection: close`, so the body is read by its length, not to EOF.
fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content = if method == "GET" {
        String::new()
    } else {
        format!("Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n", body.len())
    };
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{content}Connection: close\r\n\r\n{body}")?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or((&line, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut payload = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            payload.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        payload.resize(length, 0);
        reader.read_exact(&mut payload)?;
    } else {
        reader.read_to_end(&mut payload)?;
    }
    Ok((status, serde_json::from_slice(&payload).unwrap_or(Value::Null)))
}

/// Standard base64 (with padding) to bytes: for the screenshot only.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", c as char),
    };
    let digits: Vec<u8> =
        text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut bits = 0u32;
        for (i, d) in chunk.iter().enumerate() {
            bits |= u32::from(*d) << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// chromedriver on a free loopback port, killed when dropped.
struct ChromeDriver {
    addr: SocketAddr,
    _process: Process,
}

impl ChromeDriver {
    fn start(dir: &Path) -> ChromeDriver {
        // chromedriver does not take port 0: borrow a free port from the kernel.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut process = Process::spawn_named(
            "chromedriver",
            Path::new(CHROMEDRIVER),
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            dir.join("chromedriver.log"),
        );
        process.first_stdout_line();
        wait_for(PAGE_WAIT, "chromedriver /status to say ready", || {
            let (_, body) = http_json(addr, "GET", "/status", None).ok()?;
            (body["value"]["ready"] == true).then_some(())
        });
        ChromeDriver { addr, _process: process }
    }
}

/// An element reference of the session.
#[derive(Clone, Debug)]
struct Element(String);

/// A WebDriver session: one headless Chromium, closed when dropped.
struct Browser {
    addr: SocketAddr,
    session: String,
}

impl Browser {
    fn open(driver: &ChromeDriver) -> Browser {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
        }}});
        let (status, body) = http_json(driver.addr, "POST", "/session", Some(&capabilities)).unwrap();
        assert_eq!(status, 200, "new session failed: {body}");
        let session = body["value"]["sessionId"].as_str().unwrap().to_owned();
        Browser { addr: driver.addr, session }
    }

    /// One command of the session; `path` is relative to the session.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WebDriverError> {
        let full = format!("/session/{}{path}", self.session);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, answer) = http_json(self.addr, method, &full, body.as_ref())
            .map_err(|e| WebDriverError { error: "io".into(), message: e.to_string() })?;
        if status == 200 {
            return Ok(answer["value"].clone());
        }
        Err(WebDriverError {
            error: answer["value"]["error"].as_str().unwrap_or("unknown").to_owned(),
            message: answer["value"]["message"].as_str().unwrap_or_default().to_owned(),
        })
    }

    fn navigate(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url }))).unwrap();
    }

    fn try_find(&self, css: &str) -> Result<Element, WebDriverError> {
        let value = self.command("POST", "/element", Some(json!({"using": "css selector", "value": css})))?;
        Ok(Element(value[ELEMENT_KEY].as_str().unwrap().to_owned()))
    }

    fn find(&self, css: &str) -> Element {
        self.try_find(css).unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    fn find_all(&self, css: &str) -> Vec<Element> {
        let value =
            self.command("POST", "/elements", Some(json!({"using": "css selector", "value": css}))).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Element(v[ELEMENT_KEY].as_str().unwrap().to_owned()))
            .collect()
    }

    fn find_within(&self, parent: &Element, css: &str) -> Result<Element, WebDriverError> {
        let path = format!("/element/{}/element", parent.0);
        let value = self.command("POST", &path, Some(json!({"using": "css selector", "value": css})))?;
        Ok(Element(value[ELEMENT_KEY].as_str().unwrap().to_owned()))
    }

    fn send_keys(&self, element: &Element, text: &str) {
        self.command("POST", &format!("/element/{}/value", element.0), Some(json!({ "text": text })))
            .unwrap();
    }

    fn clear(&self, element: &Element) {
        self.command("POST", &format!("/element/{}/clear", element.0), None).unwrap();
    }

    fn click(&self, element: &Element) {
        self.command("POST", &format!("/element/{}/click", element.0), None).unwrap();
    }

    fn try_text(&self, element: &Element) -> Result<String, WebDriverError> {
        Ok(self
            .command("GET", &format!("/element/{}/text", element.0), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn text(&self, css: &str) -> String {
        self.try_text(&self.find(css)).unwrap()
    }

    fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        let value = self.command("GET", &format!("/element/{}/attribute/{name}", element.0), None).unwrap();
        value.as_str().map(str::to_owned)
    }

    fn property(&self, element: &Element, name: &str) -> Value {
        self.command("GET", &format!("/element/{}/property/{name}", element.0), None).unwrap()
    }

    fn displayed(&self, css: &str) -> bool {
        let element = self.find(css);
        self.command("GET", &format!("/element/{}/displayed", element.0), None).unwrap() == true
    }

    /// Runs `script` (a function body) to read page state.
    fn script(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", Some(json!({"script": script, "args": []}))).unwrap()
    }

    fn screenshot(&self) -> Vec<u8> {
        base64_decode(self.command("GET", "/screenshot", None).unwrap().as_str().unwrap())
    }

    /// Polls until `check` gives `Some`, tolerating WebDriver errors such
    /// as stale elements while the page redraws.
    fn wait<T>(&self, what: &str, mut check: impl FnMut() -> Result<Option<T>, WebDriverError>) -> T {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            match check() {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(err) => last = err.to_string(),
            }
            if start.elapsed() > PAGE_WAIT {
                let page = self.script("return document.body.innerText;");
                panic!(
                    "timed out after {PAGE_WAIT:?} waiting for {what} (last error: {last}); page text:\n{page}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the text of `css` satisfies `want`; returns that text.
    fn wait_text(&self, css: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
        self.wait(what, || {
            let text = self.try_text(&self.try_find(css)?)?;
            Ok(want(&text).then_some(text))
        })
    }

    /// The summary text of every hit row shown.
    fn rows(&self) -> Vec<String> {
        let rows = self.script(
            "return Array.from(document.querySelectorAll('#results details.hit > summary'), s => s.textContent);",
        );
        rows.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; without it the browser outlives chromedriver.
        let _ = http_json(self.addr, "DELETE", &format!("/session/{}", self.session), None);
    }
}

/// A count as the page shows it: `1,234 matches`.
fn matches_text(count: u64) -> String {
    let digits = count.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped} {}", if count == 1 { "match" } else { "matches" })
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-test/page.png")
}

#[test]
fn the_page_signs_in_searches_zooms_shows_context_tails_and_never_runs_log_text() {
    if !Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{CHROMEDRIVER} is missing: install chromium and chromium-driver (tests/run does)"
        );
        eprintln!("skipped: {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)");
        return;
    }
    let started = Instant::now();
    let setup = Setup::new("web");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["HDFS_2k.log", "OpenSSH_2k.log"]);
    // A plain (unparsed) file for the hostile lines and the tail.
    let app_log = logs.join("app.log");
    let xss_line = r#"xsscanary user agent <img src=x onerror="window.__xss=1"> logged in"#;
    let ansi_line = "ansicanary \u{1b}[31mred alert\u{1b}[0m from the terminal";
    append_lines(&app_log, &[xss_line.to_owned(), ansi_line.to_owned()]);
    let config = loghub_agent_config(&setup, "web-1", collector.ingest, &files);
    let text = std::fs::read_to_string(&config).unwrap();
    let extra = format!(
        "\n[[sources]]\ninclude = [{:?}]\nread_from = \"beginning\"\n",
        app_log.display().to_string()
    );
    std::fs::write(&config, text + &extra).unwrap();
    let _agent = start_agent(&setup, "web-1", &config);
    let token = setup.token(&["default"], Role::Reader);

    // The browser starts while the samples are shipped.
    let driver = ChromeDriver::start(setup.path());
    let browser = Browser::open(&driver);
    collector.wait_total(&token, "*", 4002, Duration::from_secs(60));
    let ready = started.elapsed();

    // 1. Sign-in: the app stays hidden until a token the server accepts.
    browser.navigate(&format!("{}/", collector.api_url()));
    assert_eq!(browser.property(&browser.find("#app"), "hidden"), true, "#app shown before sign-in");
    assert!(!browser.displayed("#app"));
    let token_box = browser.find("#token");
    browser.send_keys(&token_box, "not-a-token");
    browser.click(&browser.find("#signin"));
    let refused = browser.wait_text("#signin-error", "the sign-in error", |t| !t.is_empty());
    assert!(refused.starts_with("Token rejected"), "{refused:?}");
    assert!(!browser.displayed("#app"), "a wrong token opened the app");
    browser.clear(&token_box);
    browser.send_keys(&token_box, &token);
    browser.send_keys(&token_box, ENTER);
    browser.wait("#app to show", || Ok(browser.displayed("#app").then_some(())));
    assert_eq!(browser.text("#signin-error"), "");
    assert!(browser.text("#whoami").contains("reader"), "{}", browser.text("#whoami"));
    // The first search (everything) fills the page.
    browser.wait_text("#total", "the total of everything", |t| t == matches_text(4002));

    // 2. A query: the total is the API's exact total, the rows hold the word.
    let query = "PacketResponder";
    let want_total = collector.total(&token, query);
    assert!(want_total > 100, "{want_total}");
    let query_box = browser.find("#query");
    browser.send_keys(&query_box, &format!("{query}{ENTER}"));
    browser.wait_text("#total", "the total of PacketResponder", |t| t == matches_text(want_total));
    let rows = browser.rows();
    assert_eq!(rows.len(), 100, "one page of rows");
    for row in &rows {
        assert!(row.contains(query), "a row without {query}: {row:?}");
    }
    let first_row = browser.attribute(&browser.find("#results details.hit"), "data-id").unwrap();
    assert!(browser.text("#levels").starts_with("info "), "{}", browser.text("#levels"));

    // 3. A bad query: the API's message under the box, the rows left alone.
    let bad_query = "nosuch:field";
    let (status, body) = collector.search_raw(Some(&token), &[("q", bad_query)]);
    assert_eq!(status, 400, "{body}");
    let api_message = body["error"]["message"].as_str().unwrap().to_owned();
    browser.clear(&query_box);
    browser.send_keys(&query_box, bad_query);
    browser.click(&browser.find("#search"));
    let shown = browser.wait_text("#query-error", "the query error", |t| !t.is_empty());
    assert_eq!(shown, api_message);
    assert_eq!(browser.text("#total"), matches_text(want_total), "the total changed on a bad query");
    assert_eq!(browser.rows(), rows, "the rows changed on a bad query");
    assert_eq!(browser.attribute(&browser.find("#results details.hit"), "data-id").unwrap(), first_row);
    assert!(!browser.displayed("#error"), "a bad query is not a page error: {}", browser.text("#error"));

    // 4. Hostile log text stays text: no <img> made, no script run, and an
    // ANSI escape is shown as an escape.
    browser.clear(&query_box);
    browser.send_keys(&query_box, &format!("xsscanary OR ansicanary{ENTER}"));
    browser.wait_text("#total", "the hostile lines", |t| t == matches_text(2));
    assert_eq!(browser.text("#query-error"), "", "the query error stayed");
    let rows = browser.rows();
    let xss_row = rows.iter().find(|r| r.contains("xsscanary")).expect("the XSS row");
    assert!(xss_row.contains(r#"<img src=x onerror="window.__xss=1">"#), "{xss_row:?}");
    let ansi_row = rows.iter().find(|r| r.contains("ansicanary")).expect("the ANSI row");
    assert!(ansi_row.contains(r"\x1b[31mred alert\x1b[0m"), "{ansi_row:?}");
    assert!(!ansi_row.contains('\u{1b}'), "a raw ESC reached the page: {ansi_row:?}");
    assert_eq!(browser.script("return document.querySelectorAll('#results .esc').length;"), 2);
    assert_eq!(browser.script("return document.querySelectorAll('img').length;"), 0);
    assert_eq!(browser.script("return typeof window.__xss;"), "undefined");

    // 5. The histogram: clicking the tallest bucket zooms to it.
    browser.clear(&query_box);
    browser.send_keys(&query_box, &format!("{query}{ENTER}"));
    browser.wait_text("#total", "the total of PacketResponder again", |t| t == matches_text(want_total));
    // Each bucket's count, from its <title>; the histogram is drawn just
    // after the total, so wait until its buckets add up to that total.
    let counts = browser.wait("the histogram's buckets to add up to the total", || {
        let counts = browser.script(
            "return Array.from(document.querySelectorAll('#histogram g.bucket'), g => \
             Number(g.querySelector('title').textContent.split(', ')[1].split(' ')[0].replace(/,/g, '')));",
        );
        let counts: Vec<u64> = counts.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
        Ok((counts.iter().sum::<u64>() == want_total).then_some(counts))
    });
    let buckets = browser.find_all("#histogram svg g.bucket");
    assert_eq!(counts.len(), buckets.len());
    assert!(buckets.len() > 1, "one bucket: {counts:?}");
    let tallest = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap();
    assert!(counts[tallest] < want_total, "one bucket holds everything: {counts:?}");
    // An SVG <title> is not rendered, so WebDriver's text is empty: read the DOM.
    let title = browser.property(&browser.find_within(&buckets[tallest], "title").unwrap(), "textContent");
    let title = title.as_str().unwrap().to_owned();
    assert!(title.ends_with(&format!(" UTC, {}", matches_text(counts[tallest]))), "{title:?}");
    browser.click(&buckets[tallest]);
    let zoomed = browser.wait_text("#total", "the zoomed total", |t| t == matches_text(counts[tallest]));
    let range = browser.property(&browser.find("#range"), "value");
    assert_eq!(range, "custom");
    let from = browser.property(&browser.find("#from"), "value").as_str().unwrap().to_owned();
    let to = browser.property(&browser.find("#to"), "value").as_str().unwrap().to_owned();
    assert!(!from.is_empty() && !to.is_empty() && from < to, "{from:?} {to:?}");
    let (status, body) =
        collector.search_raw(Some(&token), &[("q", query), ("from", &from), ("to", &to), ("limit", "1")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], counts[tallest], "the API disagrees with the bucket {title:?}");
    println!("zoomed to {from} .. {to}: {zoomed} (bucket {title:?})");
    let rows = browser.rows();
    assert_eq!(rows.len() as u64, counts[tallest].min(100));
    // Rows start with their time as the page shows it: UTC, no `T`, no `Z`.
    let shown_time = |rfc3339: &str| rfc3339.replace('T', " ").trim_end_matches('Z').to_owned();
    let (from_shown, to_shown) = (shown_time(&from), shown_time(&to));
    for row in &rows {
        let time = &row[..from_shown.len()];
        assert!(*from_shown <= *time && *time < *to_shown, "a row outside {from} .. {to}: {row:?}");
    }

    // 6. Context: open a hit, ask for the lines around it.
    let hit = browser.find("#results details.hit");
    browser.click(&browser.find_within(&hit, "summary").unwrap());
    let button = browser.wait("the context button", || Ok(browser.find_within(&hit, ".context-btn").ok()));
    assert!(
        browser
            .try_text(&browser.find_within(&hit, "table.fields").unwrap())
            .unwrap()
            .contains("fields.component")
    );
    browser.click(&button);
    let context_hit = browser.wait("the context's hit line", || {
        let line = browser.find_within(&hit, ".context .context-hit")?;
        Ok(Some(browser.try_text(&line)?))
    });
    assert!(context_hit.contains(query), "{context_hit:?}");
    let lines = browser.script("return document.querySelectorAll('#results .context .ctx-line').length;");
    assert!(lines.as_u64().unwrap() > 1, "the context holds only the hit: {lines}");

    // 7. Live tail: a new matching line shows up on top without a search.
    browser.click(&browser.find("#tail"));
    browser.wait_text("#tail-status", "the tail to connect", |t| t == "tailing");
    let fresh_word = format!("tailcanary{}", std::process::id());
    append_lines(&app_log, &[format!("{query} {fresh_word} from the live tail")]);
    browser.wait("the tailed line on top", || {
        let first = browser.try_text(&browser.try_find("#results details.hit > summary")?)?;
        Ok(first.contains(&fresh_word).then_some(()))
    });
    assert_eq!(browser.property(&browser.find("#tail"), "checked"), true);
    assert_eq!(browser.text("#tail-status"), "tailing");

    // 8. A screenshot of the final page, kept for people to look at.
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.canonicalize().unwrap().display());
    println!("ready after {ready:?}, done after {:?}", started.elapsed());
}
