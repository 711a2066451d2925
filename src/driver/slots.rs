//! A slab whose keys carry a generation, so a stale handle never reaches a reused slot.

use mio::Token;

/// Generations wrap at 2^21, so a key fits in 53 bits: a Lua number holds it exactly.
const GENERATION_MASK: u32 = (1 << 21) - 1;

/// A handle to a slot: index plus the generation the slot had when the value was inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// The mio token for this key; it embeds the generation so a late event for a closed entry
    /// is not delivered to a newer entry in the same slot.
    pub fn token(self) -> Token {
        Token(((self.generation as usize) << 32) | self.index as usize)
    }

    /// The key encoded by [`Key::token`].
    pub fn from_token(token: Token) -> Key {
        Key::from_u64(token.0 as u64)
    }

    /// The key as one integer below 2^53 (exact in a Lua number, LuaJIT's included).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The key [`Key::to_u64`] gave.
    pub fn from_u64(v: u64) -> Key {
        Key { index: v as u32, generation: (v >> 32) as u32 }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Generation-checked storage for driver entries.
pub struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slots<T> {
    pub fn insert(&mut self, value: T) -> Key {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return Key { index, generation: slot.generation };
        }
        let index = self.slots.len() as u32;
        self.slots.push(Slot { generation: 0, value: Some(value) });
        Key { index, generation: 0 }
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        (slot.generation == key.generation).then_some(slot.value.as_ref()).flatten()
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        (slot.generation == key.generation).then_some(slot.value.as_mut()).flatten()
    }

    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.value.as_ref())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
impl<T> Slots<T> {
    fn set_generation(&mut self, index: u32, generation: u32) {
        self.slots[index as usize].generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_key_misses_reused_slot() {
        let mut slots = Slots::default();
        let a = slots.insert("a");
        assert_eq!(slots.remove(a), Some("a"));
        let b = slots.insert("b");
        assert_eq!(slots.get(a), None, "stale key must not see the new value");
        assert_eq!(slots.remove(a), None);
        assert_eq!(slots.get(b), Some(&"b"));
        assert_eq!(slots.len(), 1);
    }

    #[test]
    fn keys_stay_exact_as_lua_numbers_when_generations_wrap() {
        let mut slots = Slots::default();
        let a = slots.insert(1);
        slots.remove(a);
        slots.set_generation(0, GENERATION_MASK);
        let old = slots.insert(2);
        assert_eq!(Key::from_u64(old.to_u64() as f64 as u64), old);
        slots.remove(old);
        let wrapped = slots.insert(3);
        assert_eq!(wrapped.generation, 0);
        assert!(old.to_u64() < 1 << 53 && wrapped.to_u64() < 1 << 53);
        assert_eq!(slots.get(old), None);
    }

    #[test]
    fn token_round_trip_keeps_generation() {
        let mut slots = Slots::default();
        let a = slots.insert(1);
        slots.remove(a);
        let b = slots.insert(2);
        assert_eq!(Key::from_token(b.token()), b);
        assert_ne!(Key::from_token(a.token()), b);
    }
}
