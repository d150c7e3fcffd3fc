//! Man pages and shell completions, as the RPM installs them.

use std::fs;
use std::io;
use std::path::Path;

/// Man pages (one per visible subcommand, `<bin>-<sub>.1`) into
/// `out_dir/man1/`, and completions into `out_dir/bash/<bin>`,
/// `out_dir/zsh/_<bin>` and `out_dir/fish/<bin>.fish` — the file names the
/// RPM installs them under.
pub fn write_docs(cmd: clap::Command, out_dir: &Path) -> io::Result<()> {
    use clap_complete::Shell;

    let name = cmd.get_name().to_string();
    let man = out_dir.join("man1");
    fs::create_dir_all(&man)?;
    // Our own walk instead of clap_mangen::generate_to, to stamp every page
    // (not only the top one) with the program's version.
    let source = match cmd.get_version() {
        Some(v) => format!("{name} {v}"),
        None => name.clone(),
    };
    let mut root = cmd.clone().disable_help_subcommand(true);
    root.build();
    write_man_pages(&root, &source, &man)?;

    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out_dir.join(dir);
        fs::create_dir_all(&dir)?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), name.as_str(), &mut buf);
        fs::write(dir.join(file), buf)?;
    }
    Ok(())
}

/// `cmd`'s page and, recursively, one per visible subcommand; after
/// `build()` their names are `<bin>-<sub>`, which is the page file name.
fn write_man_pages(cmd: &clap::Command, source: &str, dir: &Path) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, source, dir)?;
    }
    clap_mangen::Man::new(cmd.clone())
        .source(source.to_string())
        .generate_to(dir)?;
    Ok(())
}
