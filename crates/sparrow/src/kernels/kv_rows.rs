//! How the attention kernels read a cache: `groups` key/value groups (the KV heads) of
//! `cap` rows each. Keys are `dk` wide, values `dv` wide; the values are either their
//! own rows or the first `dv` values of each key row. The second is the MLA latent
//! store (DeepSeek V2/V3): the absorbed key of a position is `[c ; k_rope]` and its
//! value is `c`, so one buffer of `r + dr` values per position serves both and the
//! latent is never stored twice.

/// Where a cache's values are.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// Their own rows, (groups, cap, dv).
    Separate(&'a [f32]),
    /// The first `dv` values of each key row.
    KeyPrefix,
}

/// A cache's keys and values as the kernels scan them.
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a> {
    /// (groups, cap, dk)
    pub k: &'a [f32],
    pub values: Values<'a>,
    pub groups: usize,
    /// Rows per group (positions the buffer holds; only the visible ones are read).
    pub cap: usize,
    pub dk: usize,
    pub dv: usize,
}

impl<'a> KvRows<'a> {
    /// Keys and values in separate (groups, cap, d) buffers.
    pub fn separate(k: &'a [f32], v: &'a [f32], groups: usize, d: usize) -> Self {
        Self {
            k,
            values: Values::Separate(v),
            groups,
            cap: k.len() / (groups * d).max(1),
            dk: d,
            dv: d,
        }
    }

    /// One group of `dk`-wide key rows whose first `dv` values are the value.
    pub fn key_prefix(k: &'a [f32], dk: usize, dv: usize) -> Self {
        Self {
            k,
            values: Values::KeyPrefix,
            groups: 1,
            cap: k.len() / dk.max(1),
            dk,
            dv,
        }
    }

    /// Panics unless the buffers hold (groups, cap, width) rows: the kernels' entry
    /// check (a size mismatch is a bug of the caller, never user input).
    pub fn check(&self) {
        assert!(self.groups > 0, "attention: no KV groups");
        assert_eq!(
            self.k.len(),
            self.groups * self.cap * self.dk,
            "attention: keys are not (groups, cap, dk)"
        );
        match self.values {
            Values::Separate(v) => assert_eq!(
                v.len(),
                self.groups * self.cap * self.dv,
                "attention: values are not (groups, cap, dv)"
            ),
            Values::KeyPrefix => assert!(self.dv <= self.dk, "attention: value wider than key"),
        }
    }

    /// The value buffer and the distance between consecutive value rows.
    #[inline(always)]
    pub fn value_buffer(&self) -> (&'a [f32], usize) {
        match self.values {
            Values::Separate(v) => (v, self.dv),
            Values::KeyPrefix => (self.k, self.dk),
        }
    }

    /// Group `g` alone (groups = 1).
    #[inline(always)]
    pub fn group(&self, g: usize) -> KvRows<'a> {
        let k = &self.k[g * self.cap * self.dk..(g + 1) * self.cap * self.dk];
        let values = match self.values {
            Values::Separate(v) => {
                Values::Separate(&v[g * self.cap * self.dv..(g + 1) * self.cap * self.dv])
            }
            Values::KeyPrefix => Values::KeyPrefix,
        };
        KvRows {
            k,
            values,
            groups: 1,
            ..*self
        }
    }

    /// Key row `s` of group 0.
    #[inline(always)]
    pub fn key(&self, s: usize) -> &'a [f32] {
        &self.k[s * self.dk..(s + 1) * self.dk]
    }

    /// Value row `s` of group 0.
    #[inline(always)]
    pub fn value(&self, s: usize) -> &'a [f32] {
        let (v, stride) = self.value_buffer();
        &v[s * stride..s * stride + self.dv]
    }
}
