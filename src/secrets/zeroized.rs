//! Secret text built without leaving copies behind: a [`Zeroizing`] string wipes only the
//! buffer it holds when dropped, so every reallocation while it grows frees an unwiped copy.
//! [`concat`] allocates the final length once.

use zeroize::Zeroizing;

/// `parts` joined into one string allocated at exactly its final length (it never grows, so
/// no unwiped copy is freed on the way) and wiped when dropped.
pub fn concat(parts: &[&str]) -> Zeroizing<String> {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut text = Zeroizing::new(String::with_capacity(len));
    for part in parts {
        text.push_str(part);
    }
    text
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn the_joined_text_is_allocated_once_at_its_final_length(
            parts in proptest::collection::vec(".{0,80}", 0..12)
        ) {
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let text = concat(&refs);
            prop_assert_eq!(text.as_str(), parts.concat());
            prop_assert_eq!(text.capacity(), text.len());
        }
    }
}
