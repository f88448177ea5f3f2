//! Where the live chunks of a rewritten pack went.
//!
//! A manifest names each chunk by pack and offset, and a layer's digest is its manifest's
//! hash, so a chunk cannot be moved by changing the manifests that name it. When `strata gc`
//! rewrites a pack that is mostly dead, it copies the live regions into a new pack and leaves a
//! **forwarding map** at `moved/<hex[0..2]>/<hex of the old pack>`; a reader that finds the
//! old pack gone reads the map and fetches each chunk from where it is now. The map is only a
//! pointer: every chunk is still verified against its digest, so a wrong map costs an error,
//! never wrong bytes.
//!
//! Format (little-endian): magic `STRATAMV`, version u32 = 1, move count u32, the old pack's
//! digest (32), then per move `from` u64, `len` u64, the new pack's digest (32), `to` u64 (56
//! bytes each: bytes `from..from + len` of the old pack are bytes `to..to + len` of the new
//! one), then the BLAKE3 of everything before it (32). Moves are sorted by `from` and do not
//! overlap.

use crate::{ChunkLoc, Digest};

const MAGIC: &[u8; 8] = b"STRATAMV";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 32;
const MOVE_LEN: usize = 8 + 8 + 32 + 8;
/// A 16 MiB pack of 1-byte chunks would need fewer; anything larger is damage.
const MAX_MOVES: usize = 1 << 20;

/// Store key of the forwarding map of `pack`: `moved/<2 hex digits>/<64 hex digits>`.
pub fn moved_key(pack: &Digest) -> String {
    let hex = pack.to_hex();
    format!("moved/{}/{}", &hex[..2], hex)
}

/// Bytes `from..from + len` of the old pack are now bytes `to..to + len` of `pack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: u64,
    pub len: u64,
    pub pack: Digest,
    pub to: u64,
}

/// The forwarding map of one rewritten pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackMoves {
    pack: Digest,
    moves: Vec<Move>,
}

impl PackMoves {
    /// The map of `pack`; `None` if the moves overlap, are empty or overflow.
    pub fn new(pack: Digest, mut moves: Vec<Move>) -> Option<PackMoves> {
        moves.sort_by_key(|m| m.from);
        let mut end = 0u64;
        for m in &moves {
            let stop = m.from.checked_add(m.len)?;
            m.to.checked_add(m.len)?;
            if m.len == 0 || m.from < end {
                return None;
            }
            end = stop;
        }
        (moves.len() <= MAX_MOVES).then_some(PackMoves { pack, moves })
    }

    /// The pack this map forwards from.
    pub fn pack(&self) -> Digest {
        self.pack
    }

    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + MOVE_LEN * self.moves.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.moves.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.pack.0);
        for m in &self.moves {
            out.extend_from_slice(&m.from.to_le_bytes());
            out.extend_from_slice(&m.len.to_le_bytes());
            out.extend_from_slice(&m.pack.0);
            out.extend_from_slice(&m.to.to_le_bytes());
        }
        let sum = Digest::of(&out);
        out.extend_from_slice(&sum.0);
        out
    }

    /// The map of `pack` from its object; `None` if the bytes are damaged, of another version
    /// or another pack's map.
    pub fn parse(pack: Digest, bytes: &[u8]) -> Option<PackMoves> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, sum) = bytes.split_at(body_len);
        if body.len() < HEADER_LEN || &body[..8] != MAGIC || Digest::of(body).0[..] != sum[..] {
            return None;
        }
        let word = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let count = word(12) as usize;
        if word(8) != VERSION || count > MAX_MOVES || body.len() != HEADER_LEN + count * MOVE_LEN {
            return None;
        }
        if body[16..48] != pack.0 {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let moves = (0..count)
            .map(|i| {
                let at = HEADER_LEN + i * MOVE_LEN;
                Move {
                    from: u64_at(at),
                    len: u64_at(at + 8),
                    pack: Digest(body[at + 16..at + 48].try_into().expect("32 bytes")),
                    to: u64_at(at + 48),
                }
            })
            .collect();
        PackMoves::new(pack, moves)
    }

    /// The move holding all of `offset..offset + len`, if any.
    fn find(&self, offset: u64, len: u64) -> Option<&Move> {
        let i = self
            .moves
            .partition_point(|m| m.from <= offset)
            .checked_sub(1)?;
        let m = &self.moves[i];
        (offset.checked_add(len)? <= m.from + m.len).then_some(m)
    }

    /// Where chunk `loc` of the old pack is now; `None` if the map does not cover it (the
    /// chunk was dead when the pack was rewritten, or `loc` names another pack).
    pub fn relocate(&self, loc: &ChunkLoc) -> Option<ChunkLoc> {
        if loc.pack != self.pack {
            return None;
        }
        let m = self.find(loc.pack_offset, loc.stored_len as u64)?;
        Some(ChunkLoc {
            pack: m.pack,
            pack_offset: m.to + (loc.pack_offset - m.from),
            ..*loc
        })
    }

    /// This map with the moves into `next.pack()` sent on to where `next` moved those bytes
    /// (the pack they were moved to was itself rewritten). Bytes `next` did not keep are
    /// dropped: they were dead when it was rewritten. `None` if the result is no map (more
    /// moves than a map may hold: only maps made up to overlap in `next`'s pack get there).
    pub fn forward(&self, next: &PackMoves) -> Option<PackMoves> {
        let mut moves = Vec::with_capacity(self.moves.len());
        for m in &self.moves {
            if m.pack != next.pack {
                moves.push(*m);
                continue;
            }
            let (lo, hi) = (m.to, m.to + m.len);
            for n in &next.moves {
                let (start, stop) = (lo.max(n.from), hi.min(n.from + n.len));
                if start < stop {
                    if moves.len() >= MAX_MOVES {
                        return None;
                    }
                    moves.push(Move {
                        from: m.from + (start - lo),
                        len: stop - start,
                        pack: n.pack,
                        to: n.to + (start - n.from),
                    });
                }
            }
        }
        PackMoves::new(self.pack, moves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pack: &[u8], offset: u64, stored_len: u32) -> ChunkLoc {
        ChunkLoc {
            digest: Digest::of(b"chunk"),
            len: 4096,
            pack: Digest::of(pack),
            pack_offset: offset,
            stored_len,
        }
    }

    fn mv(from: u64, len: u64, pack: &[u8], to: u64) -> Move {
        Move {
            from,
            len,
            pack: Digest::of(pack),
            to,
        }
    }

    #[test]
    fn round_trip_relocates_only_what_it_covers_and_rejects_damage() {
        let old = Digest::of(b"old");
        let map = PackMoves::new(old, vec![mv(500, 300, b"b", 0), mv(100, 200, b"a", 40)]).unwrap();
        let bytes = map.encode();
        assert_eq!(PackMoves::parse(old, &bytes), Some(map.clone()));
        let at = |o, l| {
            map.relocate(&loc(b"old", o, l))
                .map(|c| (c.pack, c.pack_offset))
        };
        assert_eq!(at(100, 200), Some((Digest::of(b"a"), 40)));
        assert_eq!(at(150, 50), Some((Digest::of(b"a"), 90)));
        assert_eq!(at(600, 10), Some((Digest::of(b"b"), 100)));
        // Not covered: before, between, across the end of a move.
        assert_eq!(at(0, 10), None);
        assert_eq!(at(350, 10), None);
        assert_eq!(at(250, 100), None);
        assert_eq!(at(790, 20), None);
        assert_eq!(map.relocate(&loc(b"other", 100, 10)), None);
        // Damage anywhere, or another pack's map, is refused.
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(PackMoves::parse(old, &bad), None, "bit {i}");
        }
        assert_eq!(PackMoves::parse(Digest::of(b"new"), &bytes), None);
        assert_eq!(PackMoves::parse(old, &bytes[..bytes.len() - 1]), None);
        assert_eq!(PackMoves::parse(old, b""), None);
        // Overlapping, empty or overflowing moves are no map.
        assert!(PackMoves::new(old, vec![mv(0, 10, b"a", 0), mv(5, 10, b"a", 20)]).is_none());
        assert!(PackMoves::new(old, vec![mv(0, 0, b"a", 0)]).is_none());
        assert!(PackMoves::new(old, vec![mv(u64::MAX, 2, b"a", 0)]).is_none());
    }

    #[test]
    fn forwarding_a_map_through_a_second_rewrite_keeps_every_kept_byte_in_place() {
        let old = Digest::of(b"old");
        // old → mid (two runs), and some bytes → elsewhere.
        let first = PackMoves::new(
            old,
            vec![
                mv(0, 100, b"mid", 0),
                mv(1000, 100, b"mid", 100),
                mv(2000, 50, b"x", 7),
            ],
        )
        .unwrap();
        // mid is rewritten: 0..60 and 120..200 survive, into two packs.
        let second = PackMoves::new(
            Digest::of(b"mid"),
            vec![mv(0, 60, b"n1", 10), mv(120, 80, b"n2", 0)],
        )
        .unwrap();
        let composed = first.forward(&second).unwrap();
        let at = |o, l| {
            composed
                .relocate(&loc(b"old", o, l))
                .map(|c| (c.pack, c.pack_offset))
        };
        assert_eq!(at(0, 60), Some((Digest::of(b"n1"), 10)));
        assert_eq!(at(1020, 80), Some((Digest::of(b"n2"), 0)));
        assert_eq!(at(2000, 50), Some((Digest::of(b"x"), 7)));
        // What the second rewrite dropped is gone from the composed map.
        assert_eq!(at(60, 10), None);
        assert_eq!(at(1000, 20), None);
        let direct = |o, l| {
            let mid = first.relocate(&loc(b"old", o, l))?;
            second.relocate(&mid).map(|c| (c.pack, c.pack_offset))
        };
        for (o, l) in [(0, 60), (10, 20), (1020, 80), (1050, 10)] {
            assert_eq!(at(o, l), direct(o, l), "{o}+{l}");
        }
    }
}
