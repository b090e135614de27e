//! The fast CPU backend of the collectives: the same algorithms as the gRPC backend (see
//! [`crate::comm`]), over plain TCP connections, one per ordered pair of ranks that exchange messages.
//! Each rank listens on the interface of its peer endpoint and publishes the address through the
//! coordinator. The ring's links (dial the right neighbour, accept the left one) are made when the
//! ring is joined, so a missing peer shows at once; the few further links of Bruck's all-gather
//! (ranks 2, 4, 8, ... away, or within a BatchNorm group) when a collective first needs them. The
//! first bytes on a connection carry the sender's rank and the cluster token, and a connection
//! without them is turned away.
//!
//! Why beside gRPC: a ring step is one long message each way, and HTTP/2 framing, flow control and the
//! protobuf copies cost a multiple of the wire time on loopback (BENCHMARKS.md). Here a message is a
//! 20-byte header and the raw float32 bytes: sends are written straight from the tensor's memory;
//! copies are read straight into it; sums are added chunk by chunk as the bytes arrive, so a step's
//! addition overlaps its transfer. Sending and receiving run at once (the send on a scoped thread).
//!
//! Every read and write is bounded by `cluster.collective_timeout_ms`: a silent peer fails the call,
//! naming it. After any failure the links are closed and every later call fails at once (a ring that
//! lost a message can no longer tell which bytes belong to which collective).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::comm::{ring_collective, Buffer, CollectiveError, RingExecutor, Step};

const MAGIC: &[u8; 4] = b"SCR1";
const HEADER_BYTES: usize = 20;
/// Bytes read per chunk when adding what arrives into the buffer.
const ADD_CHUNK_BYTES: usize = 1 << 20;
/// A send this small fits the kernel's socket buffers and is written before receiving, without a thread.
const INLINE_SEND_BYTES: usize = 32 << 10;
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;

/// The connections, and the scratch space sums are read into.
struct Links {
    /// Where further peers connect to this rank.
    listener: TcpListener,
    /// Connections this rank dialled, by the rank at the other end: what it sends goes there.
    out: HashMap<usize, TcpStream>,
    /// Connections this rank accepted, by the rank at the other end: what it receives comes there.
    inc: HashMap<usize, TcpStream>,
    scratch: Vec<u8>,
}

impl Links {
    fn shutdown(&self) {
        for stream in self.out.values().chain(self.inc.values()) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub struct TcpRing {
    rank: usize,
    world: usize,
    /// Every rank's data address (for the errors).
    addrs: Vec<String>,
    token: Vec<u8>,
    timeout: Duration,
    /// `Err(why)` once a collective failed on the links.
    links: Mutex<Result<Option<Links>, String>>,
    next_op: AtomicU64,
}

/// Binds this rank's data listener on `ip` (the interface of the peer endpoint), on a free port.
pub fn listen(ip: IpAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, 0))
}

impl TcpRing {
    /// Joins the ring: `listener` is this rank's (from [`listen`]), `addrs` every rank's data address
    /// in rank order. Dials the right neighbour and accepts the left one, both within `timeout`.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addrs: &[String],
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<TcpRing, CollectiveError> {
        let world = addrs.len();
        let setup = |message: String| CollectiveError::Invalid { op: "tcp ring setup", message };
        if rank >= world {
            return Err(setup(format!("rank {rank} outside a world of {world}")));
        }
        let links = if world == 1 {
            None
        } else {
            let deadline = Instant::now() + timeout;
            let right = (rank + 1) % world;
            let left = (rank + world - 1) % world;
            let right_stream = dial(&addrs[right], deadline).map_err(|e| {
                setup(format!(
                    "cannot connect to rank {right} at {}: {e} (cluster.collective_timeout_ms)",
                    addrs[right]
                ))
            })?;
            let token = token.unwrap_or("").as_bytes();
            configure(&right_stream, timeout).map_err(|e| setup(e.to_string()))?;
            (&right_stream)
                .write_all(&greeting(rank, token))
                .map_err(|e| setup(format!("greeting rank {right}: {e}")))?;
            let mut inc = HashMap::new();
            accept(&listener, left, token, deadline, timeout, &mut inc).map_err(|e| {
                setup(format!(
                    "rank {left} ({}) did not join the ring: {e} (cluster.collective_timeout_ms)",
                    addrs[left]
                ))
            })?;
            Some(Links {
                listener,
                out: HashMap::from([(right, right_stream)]),
                inc,
                scratch: vec![0; ADD_CHUNK_BYTES],
            })
        };
        Ok(TcpRing {
            rank,
            world,
            addrs: addrs.to_vec(),
            token: token.unwrap_or("").as_bytes().to_vec(),
            timeout,
            links: Mutex::new(Ok(links)),
            next_op: AtomicU64::new(0),
        })
    }

    /// The connection to `peer`, dialled now if this is the first message to it.
    fn ensure_out(&self, links: &mut Links, name: &'static str, peer: usize) -> Result<(), CollectiveError> {
        if links.out.contains_key(&peer) {
            return Ok(());
        }
        // Every rank's listener is up before the addresses are shared, so a refusal means the peer
        // has gone: one attempt, not the retries of joining.
        let stream = dial_once(&self.addrs[peer], self.timeout)
            .and_then(|stream| {
                configure(&stream, self.timeout)?;
                (&stream).write_all(&greeting(self.rank, &self.token))?;
                Ok(stream)
            })
            .map_err(|e| self.link_error(name, peer, e))?;
        links.out.insert(peer, stream);
        Ok(())
    }

    /// The connection from `peer`, accepted now if this is the first message from it (connections of
    /// other peers that arrive meanwhile are kept for their turn).
    fn ensure_in(&self, links: &mut Links, name: &'static str, peer: usize) -> Result<(), CollectiveError> {
        if links.inc.contains_key(&peer) {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        accept(&links.listener, peer, &self.token, deadline, self.timeout, &mut links.inc)
            .map_err(|e| self.link_error(name, peer, e))
    }

    /// An I/O failure on the link with `peer`, as the caller sees it.
    fn link_error(&self, op: &'static str, peer: usize, e: std::io::Error) -> CollectiveError {
        let addr = self.addrs[peer].clone();
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CollectiveError::Timeout { op, peer, addr, timeout_ms: self.timeout.as_millis() as u64 }
            }
            ErrorKind::UnexpectedEof => CollectiveError::Link {
                op,
                peer,
                addr,
                message: "the peer closed the connection (did it exit?)".into(),
            },
            ErrorKind::ConnectionRefused => CollectiveError::Link {
                op,
                peer,
                addr,
                message: "the peer refused the connection (did it exit?)".into(),
            },
            _ => CollectiveError::Link { op, peer, addr, message: e.to_string() },
        }
    }

    /// One step: the send (on a scoped thread unless small) while this thread receives. `seq` numbers
    /// the messages on each link: (the step's send on its link, the step's receive on its link).
    fn step(
        &self,
        links: &mut Links,
        name: &'static str,
        op: u64,
        seq: (u32, u32),
        step: &Step,
        data: &mut Buffer,
    ) -> Result<(), CollectiveError> {
        if let Some((to, _)) = &step.send {
            self.ensure_out(links, name, *to)?;
        }
        if let Some((from, _)) = &step.recv {
            self.ensure_in(links, name, *from)?;
        }
        let Links { out: outs, inc: incs, scratch, .. } = links;
        let (sent, received) = seq;
        if let (Some((_, s)), Some((_, r))) = (&step.send, &step.recv) {
            assert!(s.end <= r.start || r.end <= s.start, "a step sends and receives overlapping ranges");
        }
        let outgoing = step.send.clone().map(|(to, range)| {
            (to, outs.get_mut(&to).expect("dialled above"), data.bytes_ptr(range.start), range.len() * 4)
        });
        let incoming = step.recv.clone().map(|(from, range)| {
            (from, incs.get_mut(&from).expect("accepted above"), data.slice_mut(range.start, range.end))
        });
        let send = |stream: &mut TcpStream, ptr: SendPtr, len: usize| -> std::io::Result<()> {
            let mut header = [0u8; HEADER_BYTES];
            header[..8].copy_from_slice(&op.to_le_bytes());
            header[8..12].copy_from_slice(&sent.to_le_bytes());
            header[12..20].copy_from_slice(&(len as u64).to_le_bytes());
            stream.write_all(&header)?;
            // SAFETY: `len` bytes of the buffer's send range, which nothing writes during the step (the
            // receive range is disjoint, checked above) and which outlives the scope.
            stream.write_all(unsafe { std::slice::from_raw_parts(ptr.0, len) })
        };
        let receive = |from: usize, stream: &mut TcpStream, scratch: &mut Vec<u8>, dst: &mut [f32]| {
            let mut header = [0u8; HEADER_BYTES];
            stream.read_exact(&mut header).map_err(|e| self.link_error(name, from, e))?;
            let got_op = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let got_seq = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            let got_len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
            if (got_op, got_seq, got_len) != (op, received, dst.len() as u64 * 4) {
                return Err(CollectiveError::Invalid {
                    op: name,
                    message: format!(
                        "rank {from} sent collective #{got_op} message {got_seq} of {got_len} bytes where #{op} message {received} of {} bytes was expected (ranks issued different collectives, or tensors of different shapes)",
                        dst.len() * 4
                    ),
                });
            }
            read_into(stream, scratch, dst, step.add).map_err(|e| self.link_error(name, from, e))
        };
        match (outgoing, incoming) {
            (Some((to, out, ptr, len)), Some((from, inc, dst))) if len <= INLINE_SEND_BYTES => {
                send(out, ptr, len).map_err(|e| self.link_error(name, to, e))?;
                receive(from, inc, scratch, dst)
            }
            (Some((to, out, ptr, len)), Some((from, inc, dst))) => std::thread::scope(|s| {
                let sender = s.spawn(|| send(out, ptr, len));
                let received = receive(from, inc, scratch, dst);
                let sent = sender.join().unwrap_or_else(|_| Err(std::io::Error::other("the send thread panicked")));
                // A receive failure is the more telling one (it names the silent peer).
                received?;
                sent.map_err(|e| self.link_error(name, to, e))
            }),
            (Some((to, out, ptr, len)), None) => send(out, ptr, len).map_err(|e| self.link_error(name, to, e)),
            (None, Some((from, inc, dst))) => receive(from, inc, scratch, dst),
            (None, None) => Ok(()),
        }
    }
}

/// A pointer into the buffer's send range, handed to the send thread.
#[derive(Clone, Copy)]
struct SendPtr(*const u8);
// SAFETY: the memory stays alive and unwritten for the whole step (see `TcpRing::step`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl Buffer {
    fn bytes_ptr(&self, element: usize) -> SendPtr {
        SendPtr(self.slice(element).as_ptr().cast())
    }
}

/// Reads `dst.len()` floats from `stream`: straight into `dst` (copy), or through `scratch` in chunks
/// added into `dst` as they arrive.
fn read_into(stream: &mut TcpStream, scratch: &mut [u8], dst: &mut [f32], add: bool) -> std::io::Result<()> {
    if !add {
        // SAFETY: f32 has no invalid bit patterns; the bytes are little-endian float32 like the host's.
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len() * 4) };
        return stream.read_exact(bytes);
    }
    let per_chunk = scratch.len() / 4;
    for out in dst.chunks_mut(per_chunk) {
        let bytes = &mut scratch[..out.len() * 4];
        stream.read_exact(bytes)?;
        for (d, s) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
    }
    Ok(())
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Larger kernel buffers keep both directions streaming while the other side adds a chunk (the
    // kernel caps them at net.core.{w,r}mem_max; a refusal only costs speed).
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        let bytes: libc::c_int = SOCKET_BUFFER_BYTES;
        // SAFETY: setsockopt on an open socket with a c_int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Connects to `addr` once, waiting at most `timeout`.
fn dial_once(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let a = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "resolves to nothing"))?;
    TcpStream::connect_timeout(&a, timeout)
}

/// Connects to `addr`, retrying until `deadline` (the peer may still be setting up).
fn dial(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let attempt = addr.to_socket_addrs().and_then(|mut addrs| {
            let a = addrs.next().ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "resolves to nothing"))?;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            TcpStream::connect_timeout(&a, left)
        });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The first bytes on a connection: who dials, with the cluster token.
fn greeting(rank: usize, token: &[u8]) -> Vec<u8> {
    let mut hello = Vec::with_capacity(12 + token.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(token.len() as u32).to_le_bytes());
    hello.extend_from_slice(token);
    hello
}

/// Accepts connections until rank `wanted`'s is among `accepted` (the connections accepted so far, by
/// rank): one whose greeting carries the cluster token and names a rank not connected yet is kept;
/// anything else is closed and the wait goes on, until `deadline`.
fn accept(
    listener: &TcpListener,
    wanted: usize,
    token: &[u8],
    deadline: Instant,
    timeout: Duration,
    accepted: &mut HashMap<usize, TcpStream>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut last_refusal = String::from("no connection");
    while !accepted.contains_key(&wanted) {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false)?;
                configure(&stream, timeout)?;
                match read_greeting(&stream, token) {
                    Ok(rank) if !accepted.contains_key(&(rank as usize)) => {
                        accepted.insert(rank as usize, stream);
                        continue;
                    }
                    Ok(rank) => last_refusal = format!("{from} greeted as rank {rank}, already connected"),
                    Err(e) => last_refusal = format!("{from}: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Err(std::io::Error::new(ErrorKind::TimedOut, format!("last: {last_refusal}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn read_greeting(mut stream: &TcpStream, token: &[u8]) -> std::io::Result<u32> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    if &head[..4] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a simclr-cluster ring connection"));
    }
    let rank = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    if len > 4096 {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "oversized token"));
    }
    let mut theirs = vec![0u8; len];
    stream.read_exact(&mut theirs)?;
    if !simclr_proto::client::same_secret(&theirs, token) {
        return Err(std::io::Error::new(ErrorKind::PermissionDenied, "wrong cluster token"));
    }
    Ok(rank)
}

impl RingExecutor for TcpRing {
    fn ring_rank(&self) -> usize {
        self.rank
    }

    fn ring_world(&self) -> usize {
        self.world
    }

    fn execute(&self, name: &'static str, plan: &[Step], data: &mut Buffer) -> Result<(), CollectiveError> {
        let mut guard = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let links = match &mut *guard {
            Ok(Some(links)) => links,
            Ok(None) => return Ok(()),
            Err(why) => {
                return Err(CollectiveError::Invalid {
                    op: name,
                    message: format!("the ring links failed in an earlier collective ({why})"),
                })
            }
        };
        let op = self.next_op.fetch_add(1, Ordering::SeqCst);
        // Messages are numbered per link, as in the gRPC backend.
        let (mut sent, mut received) = (vec![0u32; self.world], vec![0u32; self.world]);
        for step in plan {
            let to = step.send.as_ref().map(|(to, _)| *to);
            let from = step.recv.as_ref().map(|(from, _)| *from);
            let seq = (to.map_or(0, |p| sent[p]), from.map_or(0, |p| received[p]));
            if let Err(e) = self.step(links, name, op, seq, step, data) {
                links.shutdown();
                *guard = Err(e.to_string());
                return Err(e);
            }
            if let Some(p) = to {
                sent[p] += 1;
            }
            if let Some(p) = from {
                received[p] += 1;
            }
        }
        Ok(())
    }
}

ring_collective!(TcpRing);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_without_the_token_is_turned_away() {
        let listener = listen("127.0.0.1".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let intruder = std::thread::spawn({
            let addr = addr.clone();
            move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                let mut hello = MAGIC.to_vec();
                hello.extend_from_slice(&1u32.to_le_bytes());
                hello.extend_from_slice(&5u32.to_le_bytes());
                hello.extend_from_slice(b"guess");
                s.write_all(&hello).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let deadline = Instant::now() + Duration::from_millis(400);
        let e = accept(&listener, 1, b"secret", deadline, Duration::from_secs(1), &mut HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("wrong cluster token"), "{e}");
        intruder.join().unwrap();
    }
}
