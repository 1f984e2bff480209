//! The configuration reference, `docs/configuration.md`, generated from the CLI
//! definitions.
//!
//! The page lists every command with every flag, its environment variable, its default
//! and its help, taken from the same `clap` definitions that `--help` prints, so it
//! cannot say something the binary does not do. A unit test regenerates it and fails when
//! the committed page differs (the page is rewritten in place, ready to commit), the way
//! generated sources are kept honest.

use clap::{Arg, ArgAction, Command as ClapCommand, CommandFactory};

use crate::cli::Cli;

/// Where the page lives, relative to the repository root.
pub const PATH: &str = "docs/configuration.md";

/// The page, as Markdown.
pub fn configuration_page() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = String::new();
    out.push_str(INTRO);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        section(&mut out, &["radflow"], sub);
    }
    out
}

const INTRO: &str = "\
# Configuration

This page is generated from radflow's command-line definitions (`src/reference.rs`);
a test fails when it differs from what `radflow <command> --help` prints. Do not edit it by
hand: change the flag's doc comment in the code and run
`cargo nextest run -p radflow configuration_reference` to rewrite it.

Every flag also reads an environment variable, named in the table; a flag given on the
command line wins over the variable. Flags shared by several commands (NATS, store,
HTTP, telemetry, models) have the same name and variable everywhere, which is what
`compose.yaml` and the Kubernetes manifests set. Secrets (`--nats-password`,
`--nats-token`, S3 keys) are read from the environment or from files and never logged.
An S3 store (`--store-url s3://bucket[/prefix]`) takes its endpoint and credentials from
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`.

`radflow` without a command is `radflow run`.
";

fn section(out: &mut String, parents: &[&str], cmd: &ClapCommand) {
    let mut path: Vec<&str> = parents.to_vec();
    path.push(cmd.get_name());
    let name = path.join(" ");
    out.push_str(&format!("\n## `{name}`\n\n"));
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        out.push_str(&one_paragraph_per_line(&about.to_string()));
        out.push_str("\n\n");
    }
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !is_builtin(a))
        .collect();
    if args.is_empty() {
        if cmd.has_subcommands() {
            out.push_str("Commands:\n");
        } else {
            out.push_str("No options.\n");
        }
    } else {
        out.push_str("| flag | variable | default | meaning |\n| --- | --- | --- | --- |\n");
        for arg in args {
            out.push_str(&row(arg));
        }
    }
    for sub in cmd.get_subcommands() {
        if !sub.is_hide_set() {
            section(out, &path, sub);
        }
    }
}

/// `--help` and `--version`, which every command has.
fn is_builtin(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Help | ArgAction::Version)
        || matches!(arg.get_id().as_str(), "help" | "version")
}

fn row(arg: &Arg) -> String {
    let flag = match (arg.get_long(), arg.get_short()) {
        (Some(long), Some(short)) => format!("`--{long}`, `-{short}`"),
        (Some(long), None) => format!("`--{long}`"),
        (None, Some(short)) => format!("`-{short}`"),
        (None, None) => format!("`<{}>`", arg.get_id().as_str().to_uppercase()),
    };
    let env = arg
        .get_env()
        .map(|e| format!("`{}`", e.to_string_lossy()))
        .unwrap_or_default();
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    let default = if defaults.is_empty() {
        String::new()
    } else {
        format!("`{}`", defaults.join(","))
    };
    let mut meaning = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| one_paragraph_per_line(&h.to_string()))
        .unwrap_or_default();
    if !meaning.is_empty() && !meaning.ends_with(['.', ':']) {
        meaning.push('.');
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if !values.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        meaning.push_str(&format!(" One of {}.", values.join(", ")));
    }
    if arg.is_required_set() {
        meaning.push_str(" Required.");
    }
    format!(
        "| {flag} | {env} | {default} | {} |\n",
        meaning.trim().replace('|', "\\|")
    )
}

/// Doc comments wrap at 90 columns; a table cell needs one line.
fn one_paragraph_per_line(text: &str) -> String {
    text.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed page is what the CLI definitions generate. When it is not, the page
    /// is rewritten (commit the result) and the test fails, so CI never passes with a
    /// stale reference.
    #[test]
    fn configuration_reference_matches_the_cli() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
        let expected = configuration_page();
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual != expected {
            std::fs::write(&path, &expected).expect("rewrite docs/configuration.md");
            panic!(
                "{PATH} did not match the CLI definitions; it has been regenerated: review and commit it"
            );
        }
    }

    /// Every flag of every command appears in the page with its variable, so a flag
    /// cannot be added without being documented.
    #[test]
    fn every_flag_and_variable_is_on_the_page() {
        let page = configuration_page();
        let mut cmd = Cli::command();
        cmd.build();
        let mut stack: Vec<&ClapCommand> = cmd.get_subcommands().collect();
        let mut checked = 0;
        while let Some(sub) = stack.pop() {
            stack.extend(sub.get_subcommands());
            for arg in sub
                .get_arguments()
                .filter(|a| !a.is_hide_set() && !is_builtin(a))
            {
                if let Some(long) = arg.get_long() {
                    assert!(page.contains(&format!("`--{long}`")), "--{long} missing");
                }
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    assert!(page.contains(&format!("`{env}`")), "{env} missing");
                }
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} flags found");
        assert!(page.contains("## `radflow run`"));
        assert!(page.contains("`RADFLOW_NATS_URL`"));
    }
}
