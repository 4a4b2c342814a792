//! Physical Region Page lists (NVMe 1.4 section 4.3) for a buffer that is
//! contiguous in I/O virtual address space: PRP1 is the buffer's address,
//! PRP2 the second page or a list of the rest, chained when a list page fills.

use super::spec::PAGE;

/// Entries per list page; the last one chains to the next page when needed.
pub const ENTRIES_PER_PAGE: usize = (PAGE / 8) as usize;

/// The page addresses a transfer of `len` bytes at `iova` touches: the
/// first with its offset, then each following page boundary.
pub fn entries(iova: u64, len: u64) -> Vec<u64> {
    if len == 0 {
        return vec![iova];
    }
    let first_page = iova & !(PAGE - 1);
    let last_page = (iova + len - 1) & !(PAGE - 1);
    let mut v = vec![iova];
    let mut p = first_page + PAGE;
    while p <= last_page {
        v.push(p);
        p += PAGE;
    }
    v
}

/// How many list pages a transfer needs (0 when PRP1 and PRP2 suffice).
pub fn list_pages_needed(iova: u64, len: u64) -> usize {
    let n = entries(iova, len).len();
    if n <= 2 {
        return 0;
    }
    let rest = n - 1;
    // Each page but the last gives up one slot to the chain pointer.
    let mut pages = 1;
    let mut capacity = ENTRIES_PER_PAGE;
    while capacity < rest {
        pages += 1;
        capacity += ENTRIES_PER_PAGE - 1;
    }
    pages
}

/// A built data pointer: the two command fields and the list pages to write.
#[derive(Debug, PartialEq, Eq)]
pub struct Prps {
    pub prp1: u64,
    pub prp2: u64,
    /// (page address, entries to write at its start).
    pub lists: Vec<(u64, Vec<u64>)>,
}

/// Builds the PRPs for `len` bytes at `iova`, using `list_pages` (page
/// aligned addresses) for the lists. None if too few list pages are given.
pub fn build(iova: u64, len: u64, list_pages: &[u64]) -> Option<Prps> {
    let e = entries(iova, len);
    match e.len() {
        1 => {
            return Some(Prps {
                prp1: e[0],
                prp2: 0,
                lists: vec![],
            })
        }
        2 => {
            return Some(Prps {
                prp1: e[0],
                prp2: e[1],
                lists: vec![],
            })
        }
        _ => {}
    }
    if list_pages.len() < list_pages_needed(iova, len) {
        return None;
    }
    let mut rest = &e[1..];
    let mut lists = Vec::new();
    for (i, &page) in list_pages.iter().enumerate() {
        if rest.len() <= ENTRIES_PER_PAGE {
            lists.push((page, rest.to_vec()));
            break;
        }
        let (now, later) = rest.split_at(ENTRIES_PER_PAGE - 1);
        let mut list = now.to_vec();
        list.push(list_pages[i + 1]);
        lists.push((page, list));
        rest = later;
    }
    Some(Prps {
        prp1: e[0],
        prp2: list_pages[0],
        lists,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_and_two_pages() {
        let p = build(0x10_0000, 4096, &[]).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x10_0000, 0));
        let p = build(0x10_0200, 4096, &[]).unwrap();
        assert_eq!(
            (p.prp1, p.prp2),
            (0x10_0200, 0x10_1000),
            "an offset buffer spills into a second page"
        );
        let p = build(0x10_0000, 8192, &[]).unwrap();
        assert_eq!(p.prp2, 0x10_1000);
        assert!(p.lists.is_empty());
        assert_eq!(p.prp1, 0x10_0000);
        assert_eq!(build(0x10_0000, 512, &[]).unwrap().prp2, 0);
    }

    #[test]
    fn a_list() {
        let p = build(0x10_0000, 128 << 10, &[0x90_0000]).unwrap();
        assert_eq!(p.prp1, 0x10_0000);
        assert_eq!(p.prp2, 0x90_0000);
        assert_eq!(p.lists.len(), 1);
        let (page, list) = &p.lists[0];
        assert_eq!(*page, 0x90_0000);
        assert_eq!(list.len(), 31);
        assert_eq!(list[0], 0x10_1000);
        assert_eq!(list[30], 0x11_f000);
        assert_eq!(build(0x10_0000, 128 << 10, &[]), None);
    }

    #[test]
    fn chained_lists() {
        // 1 + 511 + 512 pages: the first list chains to a second.
        let len = (1 + 511 + 512) * PAGE;
        assert_eq!(list_pages_needed(0, len), 2);
        let p = build(0, len, &[0xa000_0000, 0xb000_0000]).unwrap();
        assert_eq!(p.lists.len(), 2);
        assert_eq!(p.lists[0].1.len(), 512);
        assert_eq!(p.lists[0].1[511], 0xb000_0000, "last entry chains");
        assert_eq!(p.lists[0].1[510], 511 * PAGE);
        assert_eq!(p.lists[1].1.len(), 512);
        assert_eq!(p.lists[1].1[511], 1023 * PAGE);
        // One page fewer fits in a single list.
        assert_eq!(list_pages_needed(0, 513 * PAGE), 1);
        assert_eq!(list_pages_needed(0, 514 * PAGE), 2);
    }
}
