//! Reading a case out of fuzz bytes, and mutating seed inputs.

/// A cursor over fuzz bytes. Reading past the end yields zeros, so every byte string decodes
/// to some case and short inputs decode to simple ones.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.u16()) % n
        }
    }
    /// One of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    /// Up to `max` bytes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Values that sit on boundaries: lengths, ports, versions, flags.
const INTERESTING: [u8; 10] = [0, 1, 2, 0x7f, 0x80, 0x81, 0xfe, 0xff, 0x40, 0x10];

/// `seed` changed by 1–8 mutations chosen by `noise`: bit flips, byte writes, boundary values,
/// insertions, deletions, duplicated or swapped ranges, truncation.
pub fn mutate(seed: &[u8], noise: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let mut n = Input::new(noise);
    let count = 1 + n.below(8);
    for _ in 0..count {
        let len = out.len();
        let at = n.below(len.max(1));
        match n.below(9) {
            0 if len > 0 => out[at] ^= 1 << n.below(8),
            1 if len > 0 => out[at] = n.u8(),
            2 if len > 0 => out[at] = n.pick(&INTERESTING),
            3 => {
                let b = n.u8();
                out.insert(at.min(len), b);
            }
            4 if len > 0 => {
                let end = (at + 1 + n.below(16)).min(len);
                out.drain(at..end);
            }
            5 if len > 0 => {
                let end = (at + 1 + n.below(16)).min(len);
                let chunk = out[at..end].to_vec();
                let to = n.below(len + 1);
                out.splice(to..to, chunk);
            }
            6 if len > 1 => {
                let other = n.below(len);
                out.swap(at, other);
            }
            7 if len > 0 => out.truncate(at),
            8 if len > 1 => {
                // A 16-bit big-endian boundary value (lengths and ports in headers).
                let v: u16 = n.pick(&[0, 1, 7, 8, 11, 12, 20, 0x7fff, 0x8000, 0xffff]);
                let at = at.min(len - 2);
                out[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }
    out
}
