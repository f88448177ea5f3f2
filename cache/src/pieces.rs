//! A ranged GET's body as the pieces it arrived in ([`strata_store::Store::get_range_pieces`]),
//! cut into the chunks it holds without first joining it into one buffer: a chunk that lies
//! within one piece is a slice of it (no copy), and only a chunk that straddles pieces is
//! copied, once, into a buffer of its own size.

use bytes::{Bytes, BytesMut};

pub(crate) struct Pieces {
    pieces: Vec<Bytes>,
    /// Where each piece starts in the body.
    starts: Vec<usize>,
    len: usize,
}

impl Pieces {
    pub(crate) fn new(mut pieces: Vec<Bytes>) -> Pieces {
        pieces.retain(|p| !p.is_empty());
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0;
        for p in &pieces {
            starts.push(len);
            len += p.len();
        }
        Pieces {
            pieces,
            starts,
            len,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes `from..to` of the body; `None` past its end. A range that is most of one piece is a
    /// slice of it; any other is copied into a buffer of its own size.
    pub(crate) fn slice(&self, from: usize, to: usize) -> Option<Bytes> {
        if from > to || to > self.len {
            return None;
        }
        if from == to {
            return Some(Bytes::new());
        }
        // The last piece starting at or before `from` (no piece is empty).
        let first = self.starts.partition_point(|&s| s <= from) - 1;
        let (start, piece) = (self.starts[first], &self.pieces[first]);
        // A slice keeps its whole piece (and the client's read buffer it was cut from) alive
        // for as long as the chunk stays in the memory cache, which counts only the chunk: a
        // small part of a piece is copied out instead.
        if to - start <= piece.len() && (to - from) * 2 >= piece.len() {
            return Some(piece.slice(from - start..to - start));
        }
        let mut out = BytesMut::with_capacity(to - from);
        let mut at = from;
        for (i, piece) in self.pieces.iter().enumerate().skip(first) {
            let start = self.starts[i];
            let a = at - start;
            let b = (to - start).min(piece.len());
            out.extend_from_slice(&piece[a..b]);
            at = start + b;
            if at == to {
                break;
            }
        }
        Some(out.freeze())
    }

    /// The whole body in one buffer.
    pub(crate) fn join(&self) -> Bytes {
        self.slice(0, self.len).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_range_of_every_cut_reads_the_bytes_it_names() {
        let body: Vec<u8> = (0..200u8).collect();
        for cut in [
            vec![200],
            vec![1, 199],
            vec![50, 50, 100],
            vec![7; 28].into_iter().chain([4]).collect::<Vec<usize>>(),
        ] {
            assert_eq!(cut.iter().sum::<usize>(), body.len());
            let mut at = 0;
            let pieces = Pieces::new(
                cut.iter()
                    .map(|&n| {
                        at += n;
                        Bytes::copy_from_slice(&body[at - n..at])
                    })
                    .collect(),
            );
            assert_eq!(pieces.len(), 200);
            assert_eq!(pieces.join(), body);
            for from in 0..=200 {
                for to in from..=200 {
                    assert_eq!(
                        pieces.slice(from, to).unwrap(),
                        body[from..to],
                        "{cut:?} {from}..{to}"
                    );
                }
            }
            assert!(pieces.slice(0, 201).is_none());
            assert!(pieces.slice(5, 4).is_none());
        }
        assert_eq!(Pieces::new(Vec::new()).join(), Bytes::new());
    }

    #[test]
    fn most_of_one_piece_is_not_copied_and_a_small_part_is() {
        let piece = Bytes::from(vec![9u8; 1000]);
        let pieces = Pieces::new(vec![Bytes::from(vec![1u8; 10]), piece.clone()]);
        let got = pieces.slice(20, 700).unwrap();
        assert_eq!(
            got.as_ptr(),
            piece[10..].as_ptr(),
            "a slice of the piece itself"
        );
        // A small part is copied: it must not keep the whole piece alive.
        let small = pieces.slice(20, 120).unwrap();
        assert_eq!(&small[..], &piece[10..110]);
        assert_ne!(small.as_ptr(), piece[10..].as_ptr());
    }
}
