//! The remote sink's writer: a background thread that writes JSON lines to a standalone `gainguardd`,
//! reconnecting with capped exponential backoff and replaying the last Hello and Params on reconnect.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::addr::IngestAddr;
use crate::auth::{Token, TOKEN_FILE_ENV};
use crate::events::{Envelope, Event};
use crate::wire::{encode_line, AuthLine, Greeting};

use super::options::{SinkError, SinkOptions};

/// The token a TCP sink sends: from the options' file, else from `$GAINGUARD_INGEST_TOKEN_FILE`.
pub(super) fn token_for(addr: &IngestAddr, options: &SinkOptions) -> Result<Option<Token>, SinkError> {
    if !matches!(addr, IngestAddr::Tcp(_)) {
        return Ok(None);
    }
    let path = options.token_file.clone().or_else(|| std::env::var_os(TOKEN_FILE_ENV).map(PathBuf::from));
    let Some(path) = path else {
        return Err(SinkError::Token(format!(
            "{addr} needs the daemon's token: set SinkOptions::token_file or ${TOKEN_FILE_ENV}"
        )));
    };
    Token::from_file(&path).map(Some).map_err(|e| SinkError::Token(format!("{}: {e}", path.display())))
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}


enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    #[cfg(test)]
    Fake(tests::FakeStream),
}

impl Stream {
    fn connect(addr: &IngestAddr, timeout: Duration) -> std::io::Result<Stream> {
        let s = match addr {
            IngestAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            IngestAddr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        match &s {
            Stream::Unix(u) => {
                u.set_write_timeout(Some(timeout))?;
                u.set_read_timeout(Some(timeout))?;
            }
            Stream::Tcp(t) => {
                t.set_write_timeout(Some(timeout))?;
                t.set_read_timeout(Some(timeout))?;
            }
            #[cfg(test)]
            Stream::Fake(_) => {}
        }
        Ok(s)
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
            #[cfg(test)]
            Stream::Fake(s) => s,
        }
    }

    fn set_nonblocking(&mut self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
            #[cfg(test)]
            Stream::Fake(_) => Ok(()),
        }
    }

    /// Reads the daemon's one-line greeting (docs/protocol.md).
    fn greeting(&mut self) -> std::io::Result<Greeting> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 1024 {
            match self.io().read(&mut byte)? {
                0 => break,
                _ if byte[0] == b'\n' => {
                    return serde_json::from_slice(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
                _ => line.push(byte[0]),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the daemon closed before greeting"))
    }

    /// The daemon writes nothing after its greeting, so a readable end-of-stream (or an error) means it closed
    /// the connection.
    fn peer_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let result = self.set_nonblocking(true).and_then(|_| self.io().read(&mut byte));
        let closed = match result {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        closed || self.set_nonblocking(false).is_err()
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// How the writer reaches the daemon: the address, or (in tests) scripted fake connections.
pub(super) enum Connector {
    Address(IngestAddr),
    #[cfg(test)]
    Scripted(Arc<std::sync::Mutex<std::collections::VecDeque<tests::FakeConnection>>>),
}

pub(super) struct Writer {
    connector: Connector,
    token: Option<Token>,
    options: SinkOptions,
    rx: Receiver<Envelope>,
    closed: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    pending: Arc<AtomicU64>,
    /// Encoded lines replayed after every reconnect so that a restarted daemon relearns the run.
    last_hello: Option<Vec<u8>>,
    last_params: Option<Vec<u8>>,
    /// Encoded lines taken from the buffer and not yet written; kept across a reconnect.
    batch: Vec<u8>,
    /// End offset of each line in `batch`.
    ends: Vec<usize>,
}

const BATCH: usize = 256;

impl Writer {
    /// A writer taking events from `rx`; `dropped` and `pending` are the sink's counters.
    pub(super) fn new(
        connector: Connector,
        token: Option<Token>,
        options: SinkOptions,
        rx: Receiver<Envelope>,
        closed: Arc<AtomicBool>,
        dropped: Arc<AtomicU64>,
        pending: Arc<AtomicU64>,
    ) -> Writer {
        Writer {
            connector,
            token,
            options,
            rx,
            closed,
            dropped,
            pending,
            last_hello: None,
            last_params: None,
            batch: Vec::with_capacity(64 * 1024),
            ends: Vec::new(),
        }
    }

    /// Runs the writer on its own thread; `done` is set when it has ended.
    pub(super) fn spawn(self, done: Arc<AtomicBool>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("gainguard-sink".into())
            .spawn(move || {
                let _done = SetOnDrop(done);
                self.run();
            })
            .map(|_| ())
    }

    /// `n` events left the buffer without reaching the daemon.
    fn lost(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.settled(n);
    }

    /// `n` events left the buffer (written or dropped).
    fn settled(&self, n: usize) {
        self.pending.fetch_sub(n as u64, Ordering::SeqCst);
    }

    fn run(mut self) {
        let mut stream: Option<Stream> = None;
        let mut backoff = self.options.backoff_min;
        let mut last_write = Instant::now();
        loop {
            let Some(s) = stream.as_mut() else {
                match self.open() {
                    Ok(s) => {
                        backoff = self.options.backoff_min;
                        last_write = Instant::now();
                        stream = Some(s);
                    }
                    Err(_) => {
                        if !self.wait(backoff) {
                            return self.give_up();
                        }
                        backoff = (backoff * 2).min(self.options.backoff_max);
                    }
                }
                continue;
            };
            if self.batch.is_empty() {
                match self.rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(first) => self.take_batch(first),
                    Err(RecvTimeoutError::Timeout) => {
                        let keepalive_due = last_write.elapsed() >= self.options.keepalive;
                        let alive = if keepalive_due { s.io().write_all(b"\n").is_ok() } else { !s.peer_closed() };
                        if keepalive_due {
                            last_write = Instant::now();
                        }
                        if !alive {
                            stream = None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            // A daemon that closed meanwhile is noticed before the batch goes into a dead socket.
            if s.peer_closed() || !self.write_batch(s) {
                stream = None;
            }
            last_write = Instant::now();
        }
    }

    /// Connects, authenticates, reads the greeting, and replays the last Hello and Params.
    fn open(&mut self) -> std::io::Result<Stream> {
        let mut s = match &self.connector {
            Connector::Address(addr) => Stream::connect(addr, self.options.write_timeout)?,
            #[cfg(test)]
            Connector::Scripted(script) => tests::next_fake(script)?,
        };
        if let Some(token) = &self.token {
            let mut line = serde_json::to_vec(&AuthLine { auth: token.as_str().to_string() })?;
            line.push(b'\n');
            s.io().write_all(&line)?;
        }
        match s.greeting()? {
            Greeting::Ok => {}
            Greeting::Refused { reason } => {
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("refused: {reason}")));
            }
        }
        for line in self.last_hello.iter().chain(self.last_params.iter()) {
            s.io().write_all(line)?;
        }
        Ok(s)
    }

    /// Waits `backoff`, returning false as soon as the sink was closed (dropped, or its flush time ran out).
    fn wait(&self, backoff: Duration) -> bool {
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline {
            let abandoned = Arc::strong_count(&self.dropped) == 1 && self.rx.is_empty() && self.batch.is_empty();
            if self.closed.load(Ordering::SeqCst) || abandoned {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10).min(backoff));
        }
        true
    }

    /// Counts everything still held as lost.
    fn give_up(&mut self) {
        let held = self.ends.len() + self.rx.len();
        self.batch.clear();
        self.ends.clear();
        self.lost(held);
    }

    /// Encodes up to [`BATCH`] events into `batch`, remembering the Hello and Params to replay.
    fn take_batch(&mut self, first: Envelope) {
        let rest: Vec<Envelope> = self.rx.try_iter().take(BATCH - 1).collect();
        for envelope in std::iter::once(first).chain(rest) {
            let Ok(line) = encode_line(&envelope) else {
                self.lost(1);
                continue;
            };
            match envelope.event {
                Event::Hello(_) => self.last_hello = Some(line.clone()),
                Event::Params(_) => self.last_params = Some(line.clone()),
                _ => {}
            }
            self.batch.extend_from_slice(&line);
            self.ends.push(self.batch.len());
        }
    }

    /// Writes the batch. On failure, the lines written whole count as delivered, a line cut in the middle as
    /// lost (the daemon counts it malformed), and the lines not begun stay for the next connection.
    fn write_batch(&mut self, s: &mut Stream) -> bool {
        let mut written = 0;
        let mut ok = true;
        while written < self.batch.len() {
            match s.io().write(&self.batch[written..]) {
                Ok(0) => {
                    ok = false;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        let whole = self.ends.iter().take_while(|&&end| end <= written).count();
        let line_start = if whole == 0 { 0 } else { self.ends[whole - 1] };
        let cut = usize::from(written > line_start);
        self.settled(whole);
        if cut == 1 {
            self.lost(1);
        }
        let keep_from = whole + cut;
        let byte_from = if keep_from == 0 { 0 } else { self.ends[keep_from - 1] };
        self.batch.drain(..byte_from);
        self.ends.drain(..keep_from);
        self.ends.iter_mut().for_each(|e| *e -= byte_from);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Sink, Target};
    use crate::events::{Goodbye, Hello, StepEvent};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    fn step(n: u64) -> Envelope {
        Envelope::new("r", 0, "h", n, Event::Step(StepEvent { timestamp_seconds: 1.0, ..Default::default() }))
    }

    fn hello() -> Envelope {
        let h = Hello { pid: 1, planned_steps: None, rule: "paper".into(), gamma: Some(0.5), alpha: None, reference: None };
        Envelope::new("r", 0, "h", 0, Event::Hello(h))
    }

    /// One scripted connection attempt of a fake daemon.
    pub(crate) struct FakeConnection {
        refuse_connect: bool,
        /// What the daemon says first.
        greeting: Vec<u8>,
        /// Bytes it takes before writes fail (a broken pipe).
        accepts: usize,
        /// Whether it has closed its end once the greeting is read.
        closed: bool,
        log: Arc<Mutex<Vec<u8>>>,
    }

    impl FakeConnection {
        fn ok(accepts: usize) -> Self {
            FakeConnection {
                refuse_connect: false,
                greeting: Greeting::Ok.line(),
                accepts,
                closed: false,
                log: Arc::default(),
            }
        }
    }

    pub(crate) struct FakeStream {
        read: VecDeque<u8>,
        accepts: usize,
        closed: bool,
        log: Arc<Mutex<Vec<u8>>>,
    }

    impl Read for FakeStream {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if buf.is_empty() {
                return Ok(0);
            }
            match self.read.pop_front() {
                Some(b) => {
                    buf[0] = b;
                    Ok(1)
                }
                None if self.closed => Ok(0),
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    impl Write for FakeStream {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.accepts);
            if n == 0 && !buf.is_empty() {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.accepts -= n;
            self.log.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn next_fake(script: &Mutex<VecDeque<FakeConnection>>) -> std::io::Result<Stream> {
        let Some(c) = script.lock().unwrap().pop_front() else {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        };
        if c.refuse_connect {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        Ok(Stream::Fake(FakeStream { read: c.greeting.into(), accepts: c.accepts, closed: c.closed, log: c.log }))
    }

    fn fast() -> SinkOptions {
        SinkOptions {
            capacity: 1000,
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            flush_on_drop: Duration::from_millis(200),
            ..Default::default()
        }
    }

    fn scripted(connections: Vec<FakeConnection>, options: SinkOptions) -> Sink {
        let script = Arc::new(Mutex::new(connections.into_iter().collect()));
        Sink::start(Connector::Scripted(script), None, options).unwrap()
    }

    /// The envelopes of the complete lines a fake connection received.
    fn received(log: &Mutex<Vec<u8>>) -> Vec<Envelope> {
        let bytes = log.lock().unwrap().clone();
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn every_reconnect_path_ends_without_a_panic_and_each_event_is_delivered_once_or_counted() {
        let refused = FakeConnection {
            greeting: Greeting::refused(crate::wire::RejectReason::TooManyConnections).line(),
            ..FakeConnection::ok(usize::MAX)
        };
        let closed_before_greeting = FakeConnection { greeting: Vec::new(), closed: true, ..FakeConnection::ok(usize::MAX) };
        let cut_mid_line = FakeConnection::ok(300);
        let replay_fails = FakeConnection::ok(0);
        let closed_after_replay = FakeConnection { closed: true, ..FakeConnection::ok(usize::MAX) };
        let healthy = FakeConnection::ok(usize::MAX);
        let logs: Vec<_> = [&cut_mid_line, &replay_fails, &closed_after_replay, &healthy].map(|c| Arc::clone(&c.log)).into();
        let connect_fails = FakeConnection { refuse_connect: true, ..FakeConnection::ok(0) };
        let sink = scripted(
            vec![connect_fails, refused, closed_before_greeting, cut_mid_line, replay_fails, closed_after_replay, healthy],
            fast(),
        );
        let steps = 50u64;
        assert!(sink.send(hello()));
        for i in 1..=steps {
            assert!(sink.send(step(i)));
        }
        assert!(sink.flush(Duration::from_secs(10)), "everything written or counted");
        let all: Vec<Envelope> = logs.iter().flat_map(|l| received(l)).collect();
        let delivered: Vec<u64> =
            all.iter().filter(|e| matches!(e.event, Event::Step(_))).map(|e| e.step).collect();
        let mut sorted = delivered.clone();
        sorted.dedup();
        assert_eq!(sorted, delivered, "each step at most once, in order: {delivered:?}");
        let hello_delivered = all.iter().any(|e| matches!(e.event, Event::Hello(_)));
        let dropped = sink.dropped_total();
        assert_eq!(delivered.len() as u64 + u64::from(hello_delivered) + dropped, steps + 1);
        assert_eq!(dropped, 1, "only the line cut by the broken pipe is lost");
        // After each reconnect the Hello is replayed first.
        assert!(matches!(received(&logs[3])[0].event, Event::Hello(_)));
    }

    #[test]
    fn a_sink_dropped_while_the_daemon_is_away_counts_everything_it_held() {
        let sink = scripted(Vec::new(), SinkOptions { capacity: 4, ..fast() });
        let dropped = Arc::clone(&sink.inner.dropped);
        let done = match &sink.inner.target {
            Target::Remote { done, .. } => Arc::clone(done),
            _ => unreachable!(),
        };
        let accepted = (1..=10).filter(|&i| sink.send(step(i))).count();
        assert_eq!(accepted, 4);
        drop(sink);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn an_idle_sink_sends_keepalives_and_reconnects_when_one_fails() {
        let first = FakeConnection::ok(1);
        let second = FakeConnection::ok(usize::MAX);
        let (a, b) = (Arc::clone(&first.log), Arc::clone(&second.log));
        let sink = scripted(vec![first, second], SinkOptions { keepalive: Duration::from_millis(20), ..fast() });
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*a.lock().unwrap(), b"\n");
        assert!(b.lock().unwrap().iter().all(|&c| c == b'\n') && b.lock().unwrap().len() >= 2);
        assert_eq!(sink.dropped_total(), 0);
    }

    #[test]
    fn a_tcp_sink_without_a_token_is_refused_at_connect_naming_the_variable() {
        let err = Sink::connect("tcp:127.0.0.1:9", SinkOptions { token_file: Some("/nonexistent".into()), ..Default::default() });
        assert!(matches!(err, Err(SinkError::Token(_))));
        if std::env::var_os(TOKEN_FILE_ENV).is_none() {
            let Err(SinkError::Token(msg)) = Sink::connect("tcp:127.0.0.1:9", SinkOptions::default()) else {
                panic!("a token error")
            };
            assert!(msg.contains(TOKEN_FILE_ENV), "{msg}");
        }
    }

    #[test]
    fn connect_succeeds_without_a_daemon_and_send_stays_non_blocking_when_the_buffer_fills() {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("unix:{}", dir.path().join("absent.sock").display());
        let sink = Sink::connect(&addr, SinkOptions { capacity: 16, ..Default::default() }).unwrap();
        let start = Instant::now();
        let accepted = (0..1000).filter(|&i| sink.send(step(i))).count();
        assert!(start.elapsed() < Duration::from_millis(200), "1000 sends took {:?}", start.elapsed());
        assert_eq!(accepted, 16);
        assert_eq!(sink.dropped_total(), 1000 - 16);
        let _ = sink.send(Envelope::new("r", 0, "h", 9, Event::Goodbye(Goodbye { reason: "finished".into() })));
    }

    #[test]
    fn a_remote_sink_writes_one_json_line_per_event_and_replays_hello_after_a_reconnect() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let accept = || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&Greeting::Ok.line()).unwrap();
            std::io::BufReader::new(s).lines()
        };
        let sink = Sink::connect(&format!("unix:{}", path.display()), SinkOptions::default()).unwrap();
        assert!(sink.send(hello()));
        assert!(sink.send(step(1)));
        let mut lines = accept();
        let got: Vec<Envelope> =
            (0..2).map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()).collect();
        assert_eq!(got, vec![hello(), step(1)]);
        drop(lines); // the daemon goes away
        let mut lines = accept();
        let replayed: Envelope = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(replayed, hello());
        assert!(sink.send(step(2)));
        let next: Envelope = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(next, step(2));
    }
}
