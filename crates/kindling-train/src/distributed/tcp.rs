//! A process group over TCP: rank 0 listens, every other rank connects to it, and each
//! exchange gathers the ranks' payloads at rank 0 and sends them all back (a star, as
//! PyTorch's TCPStore: rank 0 moves `world` times the payload, which is fine for the
//! rendezvous and for CPU runs of a few processes; NCCL does the GPU collectives).
//!
//! A frame is a little-endian u64 length and that many bytes. A rank that dies closes its
//! socket, so its peers' next read fails instead of waiting forever.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Result;

use super::Exchange;

/// First bytes of a connection: tells a Kindling rank from anything else on the port.
const MAGIC: &[u8; 8] = b"KINDLNG1";

pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: one link per other rank, in rank order. Other ranks: the link to rank 0.
    links: Mutex<Vec<Link>>,
}

struct Link {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Link {
    fn new(stream: TcpStream) -> io::Result<Link> {
        stream.set_nodelay(true)?;
        Ok(Link {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }

    fn send(&mut self, frames: &[&[u8]]) -> io::Result<()> {
        for f in frames {
            self.writer.write_all(&(f.len() as u64).to_le_bytes())?;
            self.writer.write_all(f)?;
        }
        self.writer.flush()
    }

    fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 8];
        self.reader.read_exact(&mut len)?;
        let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }
}

impl TcpGroup {
    /// Rank 0 listens on `addr`'s port (all interfaces) until the other `world - 1` ranks have
    /// connected; the others connect to `addr`, retrying until `timeout` (ranks start at
    /// different times). A group of one opens nothing.
    pub fn connect(addr: &str, rank: usize, world: usize, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        let links = if world == 1 {
            Vec::new()
        } else if rank == 0 {
            Self::accept_all(addr, world, deadline)?
        } else {
            vec![Self::join(addr, rank, world, deadline)?]
        };
        Ok(TcpGroup {
            rank,
            world,
            links: Mutex::new(links),
        })
    }

    fn accept_all(addr: &str, world: usize, deadline: Instant) -> io::Result<Vec<Link>> {
        let port = addr.rsplit_once(':').map_or(addr, |(_, p)| p);
        let listener = TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap_or(0)))?;
        listener.set_nonblocking(true)?;
        let mut slots: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    let mut link = Link::new(stream)?;
                    let hello = link.recv()?;
                    let r = parse_hello(&hello, world)?;
                    if slots[r - 1].is_some() {
                        return Err(io::Error::other(format!("two processes claim rank {r}")));
                    }
                    slots[r - 1] = Some(link);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| slots[r - 1].is_none()).collect();
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("ranks {missing:?} did not connect"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(slots
            .into_iter()
            .map(|l| l.expect("every slot filled"))
            .collect())
    }

    fn join(addr: &str, rank: usize, world: usize, deadline: Instant) -> io::Result<Link> {
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("rank 0 did not answer at {addr}: {e}"),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut link = Link::new(stream)?;
        let mut hello = MAGIC.to_vec();
        hello.extend((rank as u64).to_le_bytes());
        hello.extend((world as u64).to_le_bytes());
        link.send(&[&hello])?;
        Ok(link)
    }
}

/// A joining rank's greeting: the magic bytes, its rank and the world size it was told.
fn parse_hello(hello: &[u8], world: usize) -> io::Result<usize> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    if hello.len() != 24 || &hello[..8] != MAGIC {
        return Err(bad("a connection that is not a Kindling rank".into()));
    }
    let word = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().expect("8 bytes")) as usize;
    let (rank, theirs) = (word(8), word(16));
    if theirs != world {
        return Err(bad(format!(
            "rank {rank} was started with WORLD_SIZE={theirs}, rank 0 with {world}"
        )));
    }
    if rank == 0 || rank >= world {
        return Err(bad(format!("a process claims rank {rank} of {world}")));
    }
    Ok(rank)
}

impl Exchange for TcpGroup {
    fn rank_world(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    fn exchange(&self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut links = self.links.lock().expect("tcp group links");
        let mut run = || -> io::Result<Vec<Vec<u8>>> {
            if self.world == 1 {
                return Ok(vec![payload.to_vec()]);
            }
            if self.rank == 0 {
                let mut all = vec![payload.to_vec()];
                for link in links.iter_mut() {
                    all.push(link.recv()?);
                }
                let frames: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
                for link in links.iter_mut() {
                    link.send(&frames)?;
                }
                Ok(all)
            } else {
                let link = &mut links[0];
                link.send(&[payload])?;
                (0..self.world).map(|_| link.recv()).collect()
            }
        };
        run().map_err(|e| {
            candle_core::Error::Msg(format!(
                "rank {} of {}: exchange with the group failed ({e}); another rank has probably \
                 stopped",
                self.rank, self.world
            ))
        })
    }
}
