//! Helpers for the end-to-end tests: they start the real `logvault` and
//! `logvault-agent` binaries on loopback and talk to them as users and
//! peers would.
//!
//! Every child runs under `timeout`, so a test run that dies leaves no
//! server behind for long.
#![allow(missing_docs, unreachable_pub)]

pub mod generator;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logvault_certs::{Pki, Role as CertRole};
use logvault_collector::auth::{self, Claims, Role};

/// Seconds a child may live before `timeout` kills it.
const CHILD_LIFETIME_SECS: u32 = 900;

/// The loghub samples: `$LOGVAULT_LOGHUB`, else `shared/data/loghub`
/// beside the workspace.
pub fn loghub_dir() -> PathBuf {
    let dir = std::env::var_os("LOGVAULT_LOGHUB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/loghub"));
    assert!(dir.join("HDFS_2k.log").exists(), "loghub samples missing at {}", dir.display());
    dir
}

pub const SAMPLES: [&str; 8] = [
    "Apache_2k.log",
    "BGL_2k.log",
    "HDFS_2k.log",
    "Hadoop_2k.log",
    "Linux_2k.log",
    "OpenSSH_2k.log",
    "Spark_2k.log",
    "Zookeeper_2k.log",
];

/// The lines of a sample (a missing final newline does not drop a line).
pub fn sample_lines(name: &str) -> Vec<String> {
    let bytes = std::fs::read(loghub_dir().join(name)).unwrap();
    String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
}

/// The terms of a line as the index sees them: maximal runs of letters
/// and digits, lower-cased.
pub fn terms(line: &str) -> impl Iterator<Item = String> + '_ {
    line.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase)
}

/// Number of lines holding `word` as a term.
pub fn lines_with_term(lines: &[String], word: &str) -> u64 {
    let word = word.to_lowercase();
    lines.iter().filter(|line| terms(line).any(|t| t == word)).count() as u64
}

/// A built binary of the workspace, next to the test executable's target dir.
/// Found beside the running binary (a tool in `target/release`) or one
/// directory up (a test in `target/debug/deps`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let beside = exe.with_file_name(name);
    if beside.exists() {
        return beside;
    }
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("logvault-e2e-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LOGVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `check` until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process under `timeout`, killed when dropped.
pub struct Process {
    wrapper: Child,
    pid: u32,
    pub log: PathBuf,
    name: String,
}

impl Process {
    /// Starts `binary` with `args`, its stderr going to `log`.
    pub fn spawn_named(name: &str, binary: &Path, args: &[&str], log: PathBuf) -> Process {
        Process::spawn(name, binary, args, log)
    }

    fn spawn(name: &str, binary: &Path, args: &[&str], log: PathBuf) -> Process {
        Process::spawn_with_stdin(name, binary, args, log, Stdio::null())
    }

    fn spawn_with_stdin(name: &str, binary: &Path, args: &[&str], log: PathBuf, stdin: Stdio) -> Process {
        Process::spawn_with_env(name, binary, args, log, stdin, &[])
    }

    /// Starts `binary` with `args` and extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        binary: &Path,
        args: &[&str],
        log: PathBuf,
        stdin: Stdio,
        env: &[(String, String)],
    ) -> Process {
        let log_file = std::fs::File::create(&log).unwrap();
        let wrapper = Command::new("timeout")
            .arg("--signal=KILL")
            .arg(CHILD_LIFETIME_SECS.to_string())
            .arg(binary)
            .args(args)
            .env("RUST_LOG", "info,tantivy=warn")
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let wrapper_pid = wrapper.id();
        let pid = wait_for(Duration::from_secs(5), "the child under timeout", || {
            let out = Command::new("pgrep").arg("-P").arg(wrapper_pid.to_string()).output().ok()?;
            String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
        });
        Process { wrapper, pid, log, name: name.to_owned() }
    }

    /// The first line the child prints on stdout.
    pub fn first_stdout_line(&mut self) -> String {
        let stdout = self.wrapper.stdout.take().expect("stdout is read once");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "{} printed nothing; log:\n{}", self.name, self.log_text());
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        line
    }

    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(self.pid.to_string()).status();
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{} exited with {status}; log:\n{}", self.name, self.log_text());
        status
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10));
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait_for(limit, "the child to exit", || self.wrapper.try_wait().unwrap())
    }

    /// Waits for the child to exit by itself.
    pub fn wait_for_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.wrapper.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < limit,
                "{} still running after {limit:?}; its log:\n{}",
                self.name,
                digest(&self.log_text())
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{} exited with {status}; log:\n{}", self.name, self.log_text());
        status
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.wrapper.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.wrapper.try_wait().ok().flatten().is_none() {
            self.signal("KILL");
            let _ = self.wrapper.wait();
        }
    }
}

/// A PKI with a collector certificate and a token key.
pub struct Setup {
    pub dir: TempDir,
    pub pki: Pki,
    pub jwt_key: PathBuf,
    pub jwt_public: PathBuf,
}

impl Setup {
    pub fn new(label: &str) -> Setup {
        let dir = TempDir::new(label);
        let pki = Pki::init(dir.path().join("pki")).unwrap();
        pki.issue(CertRole::Collector, "collector", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let jwt_key = dir.path().join("jwt.key");
        let jwt_public = auth::ensure_key_pair(&jwt_key).unwrap();
        Setup { dir, pki, jwt_key, jwt_public }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn agent_cert(&self, name: &str) -> logvault_certs::Issued {
        self.pki.ensure(CertRole::Agent, name, &[]).unwrap()
    }

    /// A token signed with this setup's key.
    pub fn token(&self, tenants: &[&str], role: Role) -> String {
        let now = auth::now_secs();
        auth::mint(&self.jwt_key, &self.claims(tenants, role, now)).unwrap()
    }

    pub fn claims(&self, tenants: &[&str], role: Role, now: u64) -> Claims {
        Claims {
            sub: "e2e".into(),
            iss: "logvault".into(),
            aud: "logvault".into(),
            exp: now + 3600,
            nbf: now,
            iat: now,
            tenant: None,
            tenants: Some(tenants.iter().map(|t| t.to_string()).collect()),
            role,
        }
    }
}

/// Extra collector settings a test may need.
#[derive(Default, Clone)]
pub struct CollectorOptions {
    /// `ingest.listen`; default `127.0.0.1:0`.
    pub ingest_listen: Option<String>,
    /// Extra TOML appended to the configuration.
    pub extra_toml: String,
    /// `ingest.max_frame_bytes`.
    pub max_frame_bytes: Option<u32>,
    /// `ingest.handshake_timeout_ms`.
    pub handshake_timeout_ms: Option<u64>,
    /// `ingest.crl`.
    pub crl: Option<PathBuf>,
    /// TOML appended inside `[ingest]`.
    pub ingest_toml: String,
    /// `ingest.ca`; default the setup's CA.
    pub ingest_ca: Option<PathBuf>,
    /// `index.commit_interval_ms`; default 300.
    pub commit_interval_ms: Option<u64>,
    /// TOML appended inside `[api]`.
    pub api_toml: String,
    /// Extra environment variables for the collector process.
    pub env: Vec<(String, String)>,
    /// Names the collector's configuration and data directory, for several
    /// collectors in one setup; default "collector".
    pub name: Option<String>,
}

pub struct Collector {
    pub process: Process,
    pub ingest: SocketAddr,
    pub api: SocketAddr,
    /// The syslog listener, when the configuration turns it on.
    pub syslog: Option<SocketAddr>,
    pub ca: PathBuf,
}

impl Collector {
    pub fn start(setup: &Setup, options: &CollectorOptions) -> Collector {
        let collector = setup.pki.paths(CertRole::Collector, "collector");
        let name = options.name.as_deref().unwrap_or("collector");
        let config = setup.path().join(format!("{name}.toml"));
        let toml = format!(
            r#"data_dir = "{data}"

[ingest]
listen = "{listen}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
max_frame_bytes = {max_frame}
handshake_timeout_ms = {handshake}
{crl}
{ingest_toml}

[api]
listen = "127.0.0.1:0"
jwt_public_key = "{jwt}"
{api_toml}

[index]
commit_interval_ms = {commit}
{extra}
"#,
            data = setup.path().join(format!("{name}-data")).display(),
            listen = options.ingest_listen.as_deref().unwrap_or("127.0.0.1:0"),
            ca = options.ingest_ca.clone().unwrap_or_else(|| setup.pki.ca_cert()).display(),
            cert = collector.cert.display(),
            key = collector.key.display(),
            max_frame = options.max_frame_bytes.unwrap_or(16 * 1024 * 1024),
            handshake = options.handshake_timeout_ms.unwrap_or(10_000),
            crl = options
                .crl
                .as_ref()
                .map(|p| format!("crl = {:?}", p.display().to_string()))
                .unwrap_or_default(),
            jwt = setup.jwt_public.display(),
            ingest_toml = options.ingest_toml,
            // Tests poll the API hard; the rate limit has a test of its own.
            api_toml = if options.api_toml.contains("requests_per_second") {
                options.api_toml.clone()
            } else {
                format!("requests_per_second = 100000\n{}", options.api_toml)
            },
            commit = options.commit_interval_ms.unwrap_or(300),
            extra = options.extra_toml,
        );
        std::fs::write(&config, toml).unwrap();
        let n = std::fs::read_dir(setup.path()).unwrap().count();
        let log = setup.path().join(format!("{name}-{n}.log"));
        let mut process = Process::spawn_with_env(
            "collector",
            &bin("logvault"),
            &["serve", "--config", config.to_str().unwrap()],
            log,
            Stdio::null(),
            &options.env,
        );
        let line = process.first_stdout_line();
        // "ingest 127.0.0.1:P api https://127.0.0.1:Q [syslog 127.0.0.1:R]"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ingest"), "unexpected first line {line:?}");
        let ingest = words[1].parse().unwrap();
        let api = words[3].trim_start_matches("https://").parse().unwrap();
        let syslog = (words.get(4) == Some(&"syslog")).then(|| words[5].parse().unwrap());
        Collector { process, ingest, api, syslog, ca: setup.pki.ca_cert() }
    }

    pub fn api_url(&self) -> String {
        format!("https://{}", self.api)
    }

    /// GET /api/v1/search; returns (status, body).
    /// GET /metrics with `token`; returns (status, body).
    pub fn metrics_raw(&self, token: &str) -> (u16, String) {
        let url = format!("{}/metrics", self.api_url());
        let answer = runtime()
            .block_on(logvault_collector::client::request("GET", &url, &self.ca, Some(token), None))
            .unwrap();
        (answer.status, String::from_utf8_lossy(&answer.body).into_owned())
    }

    /// One sample of `/metrics` (an admin token is minted), as a number.
    pub fn metric(&self, setup: &Setup, sample: &str) -> u64 {
        let (status, body) = self.metrics_raw(&setup.token(&["default"], Role::Admin));
        assert_eq!(status, 200, "{body}");
        metric(&body, sample).unwrap_or_else(|| panic!("no sample {sample} in:\n{body}"))
    }

    pub fn search_raw(&self, token: Option<&str>, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", logvault_collector::client::encode_component(v)))
            .collect();
        let url = format!("{}/api/v1/search?{}", self.api_url(), query.join("&"));
        let answer = runtime()
            .block_on(logvault_collector::client::request("GET", &url, &self.ca, token, None))
            .unwrap();
        let body = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
        (answer.status, body)
    }

    /// A request to the API with `token`; returns (status, JSON body or
    /// Null).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.api_url());
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let answer = runtime()
            .block_on(logvault_collector::client::request(method, &url, &self.ca, token, body))
            .unwrap();
        (answer.status, serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null))
    }

    /// POST /api/v1/aggregate; returns (status, body).
    pub fn aggregate(&self, token: &str, request: serde_json::Value) -> (u16, serde_json::Value) {
        self.call("POST", "/api/v1/aggregate", Some(token), Some(request))
    }

    /// The exact total of a query; panics on a non-200 answer.
    pub fn total(&self, token: &str, query: &str) -> u64 {
        let (status, body) = self.search_raw(Some(token), &[("q", query), ("limit", "1")]);
        assert_eq!(status, 200, "search {query:?} failed: {body}");
        body["total"].as_u64().unwrap()
    }

    /// Waits until `query` has exactly `want` hits (and stays there a moment).
    pub fn wait_total(&self, token: &str, query: &str, want: u64, limit: Duration) {
        let start = Instant::now();
        let mut last;
        loop {
            last = self.total(token, query);
            if last == want {
                std::thread::sleep(Duration::from_millis(700));
                let again = self.total(token, query);
                assert_eq!(again, want, "{query:?} moved past {want} to {again}");
                return;
            }
            assert!(last <= want, "{query:?} has {last} hits, more than the {want} expected");
            if start.elapsed() > limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{query:?}: {last} hits after {limit:?}, expected {want}; collector log:\n{}",
            digest(&self.process.log_text())
        );
    }
}

/// A log for a failure message: its warnings and errors from the start
/// (a condition logged once, such as a full disk, explains everything
/// after it), then its last lines.
pub fn digest(text: &str) -> String {
    let alarms: Vec<&str> =
        text.lines().filter(|line| line.contains(" WARN ") || line.contains(" ERROR ")).take(20).collect();
    format!("warnings and errors:\n{}\nlast lines:\n{}", alarms.join("\n"), tail(text, 30))
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A query term matching exactly one source.
pub fn source_query(path: &Path) -> String {
    format!("source:\"{}\"", path.display())
}

pub struct AgentOptions {
    pub read_from: &'static str,
    pub max_records: u32,
    /// TOML appended inside `[batch]`.
    pub extra_toml: String,
    /// Serve `/metrics` on a free loopback port (see [`metrics_addr`]).
    pub metrics: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self { read_from: "beginning", max_records: 2000, extra_toml: String::new(), metrics: false }
    }
}

/// The address an agent's metrics listener bound, read from its log.
pub fn metrics_addr(agent: &Process) -> SocketAddr {
    wait_for(Duration::from_secs(10), "the agent's metrics listener", || {
        let log = agent.log_text();
        let line = log.lines().find(|l| l.contains("metrics listening"))?;
        line.split("address=").nth(1)?.split_whitespace().next()?.parse().ok()
    })
}

/// GET `path` from a plain-HTTP listener; returns (status line, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of one metric in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Writes an agent configuration for `name` shipping `include` to `collector`.
pub fn agent_config(
    setup: &Setup,
    name: &str,
    collector: SocketAddr,
    include: &[String],
    options: &AgentOptions,
) -> PathBuf {
    let cert = setup.agent_cert(name);
    let config = setup.path().join(format!("agent-{name}.toml"));
    let include: Vec<String> = include.iter().map(|p| format!("{p:?}")).collect();
    let toml = format!(
        r#"state_dir = "{state}"
poll_interval_ms = 100
{metrics}

[collector]
address = "{collector}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
max_backoff_ms = 500

[[sources]]
include = [{include}]
read_from = "{read_from}"

[batch]
max_records = {max_records}
{extra}
"#,
        state = setup.path().join(format!("agent-{name}-state")).display(),
        ca = setup.pki.ca_cert().display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        include = include.join(", "),
        read_from = options.read_from,
        max_records = options.max_records,
        extra = options.extra_toml,
        metrics = if options.metrics { "metrics_listen = \"127.0.0.1:0\"" } else { "" },
    );
    std::fs::write(&config, toml).unwrap();
    config
}

/// Starts an agent whose standard input is the file `input`.
pub fn start_agent_reading(setup: &Setup, name: &str, config: &Path, input: &Path) -> Process {
    let log = setup.path().join(format!("agent-{name}-stdin.log"));
    let stdin = Stdio::from(std::fs::File::open(input).unwrap());
    Process::spawn_with_stdin(
        name,
        &bin("logvault-agent"),
        &["--config", config.to_str().unwrap()],
        log,
        stdin,
    )
}

pub fn start_agent(setup: &Setup, name: &str, config: &Path) -> Process {
    let n = std::fs::read_dir(setup.path()).unwrap().count();
    let log = setup.path().join(format!("agent-{name}-{n}.log"));
    Process::spawn(
        &format!("agent {name}"),
        &bin("logvault-agent"),
        &["--config", config.to_str().unwrap()],
        log,
    )
}

/// The agent's `[[sources]]` for the loghub samples in `files` (by file
/// name), each with the parser an operator would configure for it.
pub fn loghub_sources_toml(files: &HashMap<String, PathBuf>) -> String {
    let regex = |pattern: &str, format: &str| {
        format!("parser = \"regex\"\npattern = '{pattern}'\ntimestamp_format = \"{format}\"\n")
    };
    let millis = "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]";
    let parsers = [
        (
            "HDFS_2k.log",
            regex(
                r"^(?P<timestamp>\d{6} \d{6}) (?P<pid>\d+) (?P<level>\w+) (?P<component>[^:]+): ",
                "[year repr:last_two][month][day] [hour][minute][second]",
            ),
        ),
        (
            "Hadoop_2k.log",
            regex(
                r"^(?P<timestamp>\S+ \S+) (?P<level>\w+) \[(?P<process>[^\]]*)\] (?P<component>\S+): ",
                millis,
            ),
        ),
        (
            "Spark_2k.log",
            regex(
                r"^(?P<timestamp>\S+ \S+) (?P<level>\w+) (?P<component>[^:]+): ",
                "[year repr:last_two]/[month]/[day] [hour]:[minute]:[second]",
            ),
        ),
        (
            "Zookeeper_2k.log",
            regex(
                r"^(?P<timestamp>\S+ \S+) - (?P<level>\w+)\s+\[(?P<node>[^:]*):(?P<component>[^@]*)@(?P<id>\d+)\] - ",
                millis,
            ),
        ),
        (
            "BGL_2k.log",
            regex(
                r"^(?P<label>\S+) (?P<epoch>\d+) (?P<date>\S+) (?P<node>\S+) (?P<timestamp>\S+) \S+ (?P<type>\S+) (?P<component>\S+) (?P<level>\S+) ",
                "[year]-[month]-[day]-[hour].[minute].[second].[subsecond]",
            ),
        ),
        (
            "Apache_2k.log",
            regex(
                r"^\[(?P<timestamp>[^\]]+)\] \[(?P<level>\w+)\] ",
                "[weekday repr:short] [month repr:short] [day] [hour]:[minute]:[second] [year]",
            ),
        ),
        ("Linux_2k.log", "parser = \"syslog\"\n".to_owned()),
        ("OpenSSH_2k.log", "parser = \"syslog\"\n".to_owned()),
    ];
    let mut toml = String::new();
    for (name, parser) in parsers {
        if let Some(path) = files.get(name) {
            toml.push_str(&format!(
                "\n[[sources]]\ninclude = [{:?}]\nread_from = \"beginning\"\n{parser}",
                path.display().to_string()
            ));
        }
    }
    toml
}

/// An agent configuration for `name` whose sources are the loghub samples
/// in `files`, parsed (see [`loghub_sources_toml`]).
pub fn loghub_agent_config(
    setup: &Setup,
    name: &str,
    collector: SocketAddr,
    files: &HashMap<String, PathBuf>,
) -> PathBuf {
    let config = agent_config(setup, name, collector, &[], &AgentOptions::default());
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("[[sources]]\ninclude = []\nread_from = \"beginning\"\n", "");
    std::fs::write(&config, format!("{text}{}", loghub_sources_toml(files))).unwrap();
    config
}

/// A loghub sample's structured CSV as maps from column name to value
/// (RFC 4180 quoting).
pub fn loghub_ground_truth(sample: &str) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(loghub_dir().join(format!("{sample}_structured.csv"))).unwrap();
    let mut rows = Vec::new();
    let (mut field, mut row, mut quoted) = (String::new(), Vec::new(), false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            ('\r', false) => {}
            (c, _) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    let header = rows.remove(0);
    rows.into_iter().map(|r| header.iter().cloned().zip(r).collect()).collect()
}

/// Copies samples into `dir`, returning their new paths by name.
pub fn copy_samples(dir: &Path, names: &[&str]) -> HashMap<String, PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    names
        .iter()
        .map(|name| {
            let to = dir.join(name);
            std::fs::copy(loghub_dir().join(name), &to).unwrap();
            (name.to_string(), to)
        })
        .collect()
}

/// `count` lines of 112 pseudo-random hex digits and their number:
/// batch compression cannot shrink them much. The same on every call.
pub fn incompressible_lines(count: usize) -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|i| {
            let mut line = String::with_capacity(128);
            for _ in 0..7 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                line.push_str(&format!("{state:016x}"));
            }
            line.push_str(&format!(" n{i}"));
            line
        })
        .collect()
}

/// Appends lines to a file, each with its newline.
pub fn append_lines(path: &Path, lines: &[String]) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes()).unwrap();
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A rustls client configuration for probing the ingest port by hand.
pub fn client_tls(
    ca: &Path,
    client: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in logvault_certs::load_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                logvault_certs::load_certs(cert).unwrap(),
                logvault_certs::load_key(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A hand-driven agent connection: the native protocol without the agent,
/// for resends, forgeries and malformed input.
pub struct RawAgent {
    runtime: tokio::runtime::Runtime,
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    pub key: ring::signature::Ed25519KeyPair,
}

impl RawAgent {
    /// Connects with `name`'s certificate and sends the hello.
    pub fn connect(setup: &Setup, name: &str, addr: SocketAddr) -> RawAgent {
        let cert = setup.agent_cert(name);
        let tls = client_tls(&setup.pki.ca_cert(), Some((&cert.cert, &cert.key)), &[&rustls::version::TLS13]);
        let runtime = runtime();
        let stream = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
            logvault_storage::frame::write_frame(
                &mut stream,
                &logvault_storage::Frame::Hello { version: logvault_storage::frame::PROTOCOL_VERSION },
            )
            .await
            .unwrap();
            stream
        });
        let key_der = logvault_certs::load_key(&cert.key).unwrap();
        let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key_der.secret_der()).unwrap();
        RawAgent { runtime, stream, key }
    }

    /// A signed batch of `count` records `"{text} {seq}"` from `first_seq`,
    /// the first of its stream (previous hash zero).
    pub fn batch(&self, agent_id: &str, source: &str, first_seq: u64, count: u32, text: &str) -> Vec<u8> {
        self.batch_after(agent_id, source, first_seq, count, text, [0; 32])
    }

    /// Like [`RawAgent::batch`], chained to the batch whose hash is `prev`.
    pub fn batch_after(
        &self,
        agent_id: &str,
        source: &str,
        first_seq: u64,
        count: u32,
        text: &str,
        prev: [u8; 32],
    ) -> Vec<u8> {
        let mut builder = logvault_storage::BatchBuilder::new(agent_id, source, 0, first_seq, prev);
        for i in 0..count {
            let seq = first_seq + u64::from(i);
            builder.push(logvault_storage::WireRecord::new(
                1_700_000_000_000_000_000 + seq as i64,
                logvault_storage::Level::Info,
                format!("{text} {seq}"),
            ));
        }
        builder.sign(&self.key)
    }

    /// A version-3 batch of one record whose stored section is `stored`
    /// with the given codec byte and declared decoded length, hashed and
    /// signed like a real one: for compressed input that lies.
    pub fn forge_batch(&self, agent_id: &str, codec: u8, raw_len: u32, stored: &[u8]) -> Vec<u8> {
        logvault_storage::testing::forge_batch(
            &self.key,
            agent_id,
            "/var/log/forged-codec.log",
            3,
            codec,
            raw_len,
            stored,
        )
    }

    /// Sends raw bytes and reads the answer frame (`None` when closed).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Option<logvault_storage::Frame> {
        let stream = &mut self.stream;
        self.runtime.block_on(async {
            use tokio::io::AsyncWriteExt;
            if stream.write_all(bytes).await.is_err() || stream.flush().await.is_err() {
                return None;
            }
            let decoder = logvault_storage::FrameDecoder::new(logvault_storage::frame::DEFAULT_MAX_FRAME);
            tokio::time::timeout(Duration::from_secs(10), decoder.read(stream)).await.ok()?.ok()?
        })
    }

    /// Sends a frame and reads the answer.
    pub fn send_frame(&mut self, frame: &logvault_storage::Frame) -> Option<logvault_storage::Frame> {
        self.send_raw(&frame.encode())
    }

    /// Sends a batch frame and reads the answer.
    pub fn send_batch(&mut self, batch: Vec<u8>) -> Option<logvault_storage::Frame> {
        self.send_raw(&logvault_storage::Frame::Batch(batch).encode())
    }
}

/// A live tail (`/api/v1/tail`) read on a thread of its own; its `hit`
/// events arrive on a channel. The thread ends when the stream does.
pub struct LiveTail {
    hits: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl LiveTail {
    pub fn open(collector: &Collector, token: &str, query: &str) -> LiveTail {
        let url = format!(
            "{}/api/v1/tail?q={}",
            collector.api_url(),
            logvault_collector::client::encode_component(query)
        );
        let (ca, token) = (collector.ca.clone(), token.to_owned());
        let (sender, hits) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let streamed =
                runtime().block_on(logvault_collector::client::stream(&url, &ca, Some(&token), |chunk| {
                    pending.extend_from_slice(chunk);
                    while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = pending.drain(..end + 2).collect();
                        let text = String::from_utf8_lossy(&event);
                        if !text.starts_with("event: hit\n") {
                            continue;
                        }
                        let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
                        if sender.send(serde_json::from_str(data).unwrap()).is_err() {
                            return false;
                        }
                    }
                    true
                }));
            if let Ok(answer) = streamed {
                assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
            }
        });
        LiveTail { hits }
    }

    /// The next hit, if one comes within `limit`.
    pub fn next_hit(&self, limit: Duration) -> Option<serde_json::Value> {
        self.hits.recv_timeout(limit).ok()
    }
}

/// A real S3 server (s3s-fs) on a free loopback port, storing objects as
/// files under `root/BUCKET/KEY`; stopped when dropped. In CI a missing
/// `s3s-fs` fails the test (`tests/run` installs it).
pub struct S3Server {
    pub process: Option<Process>,
    pub endpoint: String,
    pub root: PathBuf,
    /// The environment its clients need (credentials).
    pub env: Vec<(String, String)>,
    /// The bucket, the region, and the prefix this test's objects go
    /// under (empty on s3s-fs, where each test has its own server).
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    port: u16,
    dir: PathBuf,
}

/// Where tests run against an S3 store of one's own (a Garage cluster,
/// say) instead of s3s-fs: `LOGVAULT_TEST_S3_ENDPOINT`, `_BUCKET`,
/// `_REGION` (default `garage`), with `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY`. See `tests/garage/run`.
pub const EXTERNAL_S3_ENDPOINT: &str = "LOGVAULT_TEST_S3_ENDPOINT";

const S3_ACCESS_KEY: &str = "logvault-test";
const S3_SECRET_KEY: &str = "logvault-test-secret";

impl S3Server {
    /// The store named by [`EXTERNAL_S3_ENDPOINT`] when it is set (this
    /// test's objects under a prefix of their own), else s3s-fs.
    pub fn external_or_start(dir: &Path, bucket: &str) -> S3Server {
        let Ok(endpoint) = std::env::var(EXTERNAL_S3_ENDPOINT) else { return S3Server::start(dir, bucket) };
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set with {EXTERNAL_S3_ENDPOINT}"))
        };
        let prefix = format!("{}/", dir.file_name().unwrap().to_string_lossy());
        S3Server {
            process: None,
            endpoint,
            root: PathBuf::new(),
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), var("AWS_ACCESS_KEY_ID")),
                ("AWS_SECRET_ACCESS_KEY".into(), var("AWS_SECRET_ACCESS_KEY")),
            ],
            bucket: var("LOGVAULT_TEST_S3_BUCKET"),
            region: std::env::var("LOGVAULT_TEST_S3_REGION").unwrap_or_else(|_| "garage".into()),
            prefix,
            port: 0,
            dir: dir.to_owned(),
        }
    }

    /// The URI of `path` in this test's part of the store.
    pub fn uri(&self, path: &str) -> String {
        format!(
            "s3://{}/{}{path}?endpoint={}&region={}",
            self.bucket, self.prefix, self.endpoint, self.region
        )
    }

    /// A client on this test's part of the store, credentials given.
    fn operator(&self) -> opendal::Operator {
        let key = |name: &str| self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
        let builder = opendal::services::S3::default()
            .bucket(&self.bucket)
            .root(&format!("/{}", self.prefix))
            .endpoint(&self.endpoint)
            .region(&self.region)
            .access_key_id(&key("AWS_ACCESS_KEY_ID"))
            .secret_access_key(&key("AWS_SECRET_ACCESS_KEY"))
            .disable_config_load()
            .disable_ec2_metadata();
        opendal::Operator::new(builder).unwrap().finish()
    }

    /// Every object under `path`, with its bytes, sorted by key (one deleted
    /// meanwhile left out).
    pub fn objects(&self, path: &str) -> Vec<(String, Vec<u8>)> {
        let operator = self.operator();
        runtime().block_on(async {
            let mut out = Vec::new();
            let entries = match operator.list_with(path).recursive(true).await {
                Ok(entries) => entries,
                Err(err) if err.kind() == opendal::ErrorKind::NotFound => return out,
                Err(err) => panic!("listing {path}: {err}"),
            };
            for entry in entries.into_iter().filter(|e| !e.metadata().is_dir()) {
                // One deleted between the listing and the read is left out.
                match operator.read(entry.path()).await {
                    Ok(bytes) => out.push((entry.path().to_owned(), bytes.to_vec())),
                    Err(err) if err.kind() == opendal::ErrorKind::NotFound => {}
                    Err(err) => panic!("reading {}: {err}", entry.path()),
                }
            }
            out.sort();
            out
        })
    }

    /// Replaces the object `key` (a path under this test's prefix).
    pub fn write_object(&self, key: &str, bytes: Vec<u8>) {
        let operator = self.operator();
        runtime().block_on(operator.write(key, bytes)).unwrap();
    }

    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = S3Server {
            process: None,
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
            ],
            bucket: bucket.to_owned(),
            region: "us-east-1".into(),
            prefix: String::new(),
            port,
            dir: dir.to_owned(),
        };
        server.resume();
        server
    }

    /// Stops the server (its objects stay on disk).
    pub fn pause(&mut self) {
        drop(self.process.take());
        wait_for(Duration::from_secs(10), "s3s-fs to stop listening", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err().then_some(())
        });
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) {
        let binary = Command::new("sh").args(["-c", "command -v s3s-fs"]).output().unwrap();
        let binary = String::from_utf8_lossy(&binary.stdout).trim().to_owned();
        assert!(
            !binary.is_empty(),
            "s3s-fs is not installed: cargo install --locked s3s-fs@0.14.1 --features binary"
        );
        let n = std::fs::read_dir(&self.dir).unwrap().count();
        let process = Process::spawn_named(
            "s3s-fs",
            Path::new(&binary),
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                S3_ACCESS_KEY,
                "--secret-key",
                S3_SECRET_KEY,
                self.root.to_str().unwrap(),
            ],
            self.dir.join(format!("s3s-fs-{n}.log")),
        );
        wait_for(Duration::from_secs(20), "s3s-fs to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
        self.process = Some(process);
    }
}
