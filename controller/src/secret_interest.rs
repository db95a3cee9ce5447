//! Which Secret data the policy index needs: the data key each VaultKey's `upstream.secretRef`
//! names, and `VAULT_KEY` of its own token Secret. Everything else the Secret watch reports
//! (Helm releases, TLS keys, other apps' credentials) is dropped on arrival, so the controller
//! neither keeps nor holds in memory secrets it has no use for. Pure bookkeeping.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, MutexGuard},
};

use keybrake_api::KeyId;

use crate::{
    index::SecretData,
    token::{TOKEN_SECRET_KEY, token_secret_name},
};

/// (namespace, Secret name).
pub type SecretSlot = (String, String);

/// What the Secret feed must do after a VaultKey changed what it references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Follow {
    /// A Secret already seen (and dropped, or kept without this data key) is now needed: read
    /// it again.
    Fetch(SecretSlot),
    /// Nothing references this Secret any more: drop it from the index.
    Forget(SecretSlot),
}

/// What to do with one Secret the watch reported.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Needed: put this (only the referenced data keys) in the index.
    Keep(SecretData),
    /// Not needed; `was_kept` says whether an earlier version is in the index to remove.
    Drop { was_kept: bool },
}

#[derive(Default)]
struct Inner {
    /// Per VaultKey: its upstream Secret name and data key.
    refs: HashMap<KeyId, (String, String)>,
    /// Per Secret: referenced data key → number of references.
    wanted: HashMap<SecretSlot, BTreeMap<String, u32>>,
    /// Every Secret the watch currently reports → whether it is in the index.
    seen: HashMap<SecretSlot, bool>,
}

impl Inner {
    fn add(&mut self, slot: SecretSlot, key: &str, out: &mut Vec<Follow>) {
        let keys = self.wanted.entry(slot.clone()).or_default();
        let count = keys.entry(key.to_owned()).or_default();
        *count += 1;
        if *count == 1 && self.seen.contains_key(&slot) {
            out.push(Follow::Fetch(slot));
        }
    }

    fn sub(&mut self, slot: SecretSlot, key: &str, out: &mut Vec<Follow>) {
        let Some(keys) = self.wanted.get_mut(&slot) else {
            return;
        };
        if let Some(count) = keys.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.wanted.remove(&slot);
            if self.seen.get(&slot) == Some(&true) {
                out.push(Follow::Forget(slot));
            }
        }
    }

    fn pairs(id: &KeyId, upstream: &(String, String)) -> [(SecretSlot, String); 2] {
        let ns = id.namespace().to_owned();
        [
            ((ns.clone(), upstream.0.clone()), upstream.1.clone()),
            (
                (ns, token_secret_name(id.name())),
                TOKEN_SECRET_KEY.to_owned(),
            ),
        ]
    }

    fn unreference(&mut self, id: &KeyId, out: &mut Vec<Follow>) {
        if let Some(old) = self.refs.remove(id) {
            for (slot, key) in Self::pairs(id, &old) {
                self.sub(slot, &key, out);
            }
        }
    }
}

#[derive(Default)]
pub struct SecretInterest {
    inner: Mutex<Inner>,
}

impl SecretInterest {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VaultKey `id` reads data key `key` of Secret `secret` (in its namespace).
    pub fn reference(&self, id: &KeyId, secret: &str, key: &str) -> Vec<Follow> {
        let mut inner = self.lock();
        let new = (secret.to_owned(), key.to_owned());
        if inner.refs.get(id) == Some(&new) {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Add before removing, so a Secret still referenced is never forgotten and re-read.
        for (slot, k) in Inner::pairs(id, &new) {
            inner.add(slot, &k, &mut out);
        }
        if let Some(old) = inner.refs.insert(id.clone(), new) {
            for (slot, k) in Inner::pairs(id, &old) {
                inner.sub(slot, &k, &mut out);
            }
        }
        // A Secret both forgotten and fetched in one call cannot happen (add came first).
        out
    }

    pub fn unreference(&self, id: &KeyId) -> Vec<Follow> {
        let mut out = Vec::new();
        self.lock().unreference(id, &mut out);
        out
    }

    /// Keeps only the references of `live` keys (after a VaultKey re-list).
    pub fn retain(&self, live: &HashSet<KeyId>) -> Vec<Follow> {
        let mut inner = self.lock();
        let gone: Vec<KeyId> = inner
            .refs
            .keys()
            .filter(|id| !live.contains(*id))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for id in gone {
            inner.unreference(&id, &mut out);
        }
        out
    }

    /// The watch reported Secret `slot` with `data`: what of it the index gets.
    pub fn filter(&self, slot: &SecretSlot, data: &BTreeMap<String, Vec<u8>>) -> Filtered {
        let mut inner = self.lock();
        let kept = inner.wanted.get(slot).map(|keys| {
            data.iter()
                .filter(|(k, _)| keys.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<SecretData>()
        });
        let was_kept = inner.seen.insert(slot.clone(), kept.is_some()) == Some(true);
        match kept {
            Some(data) => Filtered::Keep(data),
            None => Filtered::Drop { was_kept },
        }
    }

    /// The watch reported Secret `slot` deleted.
    pub fn deleted(&self, slot: &SecretSlot) {
        self.lock().seen.remove(slot);
    }

    /// Keeps only `live` Secrets as seen (after a Secret re-list).
    pub fn retain_seen(&self, live: &HashSet<SecretSlot>) {
        self.lock().seen.retain(|slot, _| live.contains(slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str) -> SecretSlot {
        ("ns".to_owned(), name.to_owned())
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn keeps_only_referenced_data_keys_of_referenced_secrets() {
        let interest = SecretInterest::default();
        let id = KeyId::new("ns", "k");
        assert!(interest.reference(&id, "stripe", "api-key").is_empty());
        let stripe = data(&[("api-key", "sk_1"), ("other", "unrelated")]);
        assert_eq!(
            interest.filter(&slot("stripe"), &stripe),
            Filtered::Keep(data(&[("api-key", "sk_1")]))
        );
        assert_eq!(
            interest.filter(&slot("k-token"), &data(&[("VAULT_KEY", "vault_key_x")])),
            Filtered::Keep(data(&[("VAULT_KEY", "vault_key_x")]))
        );
        // Someone else's Secret, and a "-token" Secret of no VaultKey.
        assert_eq!(
            interest.filter(&slot("helm-release"), &data(&[("release", "…")])),
            Filtered::Drop { was_kept: false }
        );
        assert_eq!(
            interest.filter(&slot("other-token"), &data(&[("VAULT_KEY", "v")])),
            Filtered::Drop { was_kept: false }
        );
        // A referenced Secret without the key stays in the index (empty): the key's problem
        // is then "no key api-key", not "no Secret".
        assert_eq!(
            interest.filter(&slot("stripe"), &data(&[("other", "x")])),
            Filtered::Keep(SecretData::new())
        );
    }

    #[test]
    fn new_references_fetch_seen_secrets_and_dropped_ones_are_forgotten() {
        let interest = SecretInterest::default();
        let k1 = KeyId::new("ns", "k1");
        let k2 = KeyId::new("ns", "k2");
        // Seen before anyone referenced it: dropped, then fetched once referenced.
        interest.filter(&slot("openai"), &data(&[("key", "sk")]));
        assert_eq!(
            interest.reference(&k1, "openai", "key"),
            vec![Follow::Fetch(slot("openai"))]
        );
        assert_eq!(
            interest.filter(&slot("openai"), &data(&[("key", "sk")])),
            Filtered::Keep(data(&[("key", "sk")]))
        );
        // A second reference to the same data key needs no fetch; another data key does.
        assert!(interest.reference(&k2, "openai", "key").is_empty());
        assert_eq!(
            interest.reference(&k2, "openai", "key2"),
            vec![Follow::Fetch(slot("openai"))]
        );
        // Re-applying the same reference is a no-op.
        assert!(interest.reference(&k2, "openai", "key2").is_empty());
        assert!(interest.unreference(&k2).is_empty(), "k1 still uses it");
        assert_eq!(
            interest.unreference(&k1),
            vec![Follow::Forget(slot("openai"))]
        );
        assert_eq!(
            interest.filter(&slot("openai"), &data(&[("key", "sk")])),
            Filtered::Drop { was_kept: true }
        );
        // Moving a key to another Secret forgets the old one (once it was kept).
        interest.reference(&k1, "a", "x");
        interest.filter(&slot("a"), &data(&[("x", "1")]));
        assert_eq!(
            interest.reference(&k1, "b", "x"),
            vec![Follow::Forget(slot("a"))]
        );
        // Re-list: keys gone are unreferenced; Secrets gone are no longer seen.
        interest.filter(&slot("b"), &data(&[("x", "1")]));
        assert_eq!(
            interest.retain(&HashSet::new()),
            vec![Follow::Forget(slot("b"))]
        );
        interest.retain_seen(&HashSet::new());
        assert!(interest.reference(&k1, "b", "x").is_empty(), "b not seen");
    }
}
