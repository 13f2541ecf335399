/* jobworker-cage: run one job in namespaces of its own, as its own user, and say how it ended.
 *
 * Theory of operation
 * -------------------
 * The supervisor plans the cage (jobworker/supervisor/sandbox.py, pure Python) and execs this
 * small static program with the plan as options. It becomes three processes, each with one job:
 *
 *   keeper  the supervisor's direct child, in the host's namespaces and the supervisor's cgroup.
 *           It unshares the PID namespace (which only affects its children), forks the init, and
 *           relays the job's exact wait status as its own: the same exit code, or death by the
 *           same signal. So the supervisor sees "killed by SIGTERM" apart from "exit 143", as it
 *           did when it was the job's parent itself (tini and bwrap return 128+N for both).
 *           SIGTERM to the keeper, or EOF on the lifeline (the supervisor died), kills the init,
 *           and with it every process of the job's PID namespace: no process can leave that.
 *   init    PID 1 of the job's PID namespace, still root, outside the job's cgroups (so the
 *           cgroup's pids limit and a kill through cgroup.kill concern the job alone). It takes
 *           new mount, IPC, UTS and (on request) network namespaces, builds the job's view of the
 *           filesystem, forks the job, reaps every orphan the job leaves, and when the job ends
 *           reports its wait status to the keeper and exits; the kernel then kills whatever is
 *           left in the namespace before the keeper can reap the init.
 *   job     PID 2. It places itself in its cgroups (before its first instruction of its own),
 *           takes a cgroup namespace and mounts the cgroup filesystems afresh, read-only, so
 *           that it sees its own group as their root and no other job's; it drops to its user
 *           (supplementary groups, then gid, then uid, then no_new_privs and no capabilities),
 *           changes directory as that user, and execs the command.
 *
 * The order is bubblewrap's and for the same reasons: every step fails closed. A step that
 * fails writes one line "error STAGE ERRNO\tDETAIL" to the report fd and the job never runs;
 * there is no half-caged job. On success the keeper writes "pids INIT JOB" (host pids), and the
 * report pipe reaches EOF when the job's exec closed its close-on-exec copy.
 *
 * Nothing the job's caller controls reaches this root process's environment: the keeper starts
 * with an empty environment and reads the job's from a memfd (--env-fd), and it is linked
 * statically, so no dynamic loader runs on its behalf.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#define MOUNT_ATTR_NOSUID 0x00000002
#define MOUNT_ATTR_NODEV 0x00000004
#define MOUNT_ATTR_NOEXEC 0x00000008
struct mount_attr {
  uint64_t attr_set;
  uint64_t attr_clr;
  uint64_t propagation;
  uint64_t userns_fd;
};
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define MAX_ITEMS 64
#ifndef SOURCE_SHA256
#define SOURCE_SHA256 "unknown"
#endif

/* The plan, from the command line. Paths are absolute (the planner checks). */
struct plan {
  int report_fd;
  int lifeline_fd;  /* -1: none */
  int env_fd;       /* -1: empty environment */
  int new_net;      /* 1: a network namespace with only loopback */
  int readonly_root;
  int set_user;     /* 0: stay root with every capability */
  uid_t uid;
  gid_t gid;
  gid_t groups[NGROUPS_MAX > 256 ? 256 : NGROUPS_MAX];
  int ngroups;
  const char *chdir;
  const char *cgroups[MAX_ITEMS];   /* cgroup.procs files the job enters */
  int ncgroups;
  const char *tmpfs[MAX_ITEMS];     /* private, empty, writable by all (sticky) */
  int ntmpfs;
  const char *mqueue;               /* where to mount the new IPC namespace's mqueue fs */
  const char *hide[MAX_ITEMS];      /* covered: an empty read-only directory or file */
  int nhide;
  const char *bind[MAX_ITEMS];      /* kept visible and writable at the same path */
  int nbind;
  /* The cgroup filesystems, each "TYPE:OPTIONS:MOUNT POINT", mounted afresh (read-only) by the
     job in its cgroup namespace: it sees its own group as the root, and no other job's. */
  const char *cgroupfs[MAX_ITEMS];
  int ncgroupfs;
  char **argv;
  char **envp;
};

static struct plan P = {.report_fd = -1, .lifeline_fd = -1, .env_fd = -1};

/* ---- reporting ------------------------------------------------------------------------- */

static void report(const char *fmt, ...) {
  char line[PATH_MAX + 128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof line - 2) n = sizeof line - 2;
  line[n++] = '\n';
  /* One write of less than PIPE_BUF bytes: lines from the three processes never interleave. */
  while (write(P.report_fd, line, n) < 0 && errno == EINTR) {
  }
}

/* A setup step failed: say which and why, and make sure no job runs. */
static _Noreturn void fail(const char *stage, int err, const char *detail) {
  report("error %s %d\t%s", stage, err, detail ? detail : "");
  _exit(127);
}

static _Noreturn void usage(const char *what, const char *arg) {
  char detail[PATH_MAX + 64];
  snprintf(detail, sizeof detail, "%s %s", what, arg ? arg : "");
  if (P.report_fd < 0) {
    fprintf(stderr, "jobworker-cage: %s\n", detail);
    _exit(127);
  }
  fail("usage", EINVAL, detail);
}

/* ---- the command line ------------------------------------------------------------------ */

static long number(const char *text, long max) {
  char *end;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno || end == text || *end || value < 0 || value > max) usage("bad number:", text);
  return value;
}

static void add(const char **list, int *count, const char *path) {
  if (*count == MAX_ITEMS) usage("too many paths at", path);
  if (path[0] != '/') usage("not an absolute path:", path);
  list[(*count)++] = path;
}

static void add_cgroupfs(const char *spec) {
  const char *first = strchr(spec, ':');
  const char *second = first ? strchr(first + 1, ':') : NULL;
  if (!second || second[1] != '/') usage("not TYPE:OPTIONS:/PATH:", spec);
  if (P.ncgroupfs == MAX_ITEMS) usage("too many cgroup filesystems at", spec);
  P.cgroupfs[P.ncgroupfs++] = spec;
}

static void parse_groups(const char *text) {
  P.ngroups = 0;
  if (!*text) return;
  char *copy = strdup(text);
  if (!copy) usage("out of memory", NULL);
  for (char *save = NULL, *item = strtok_r(copy, ",", &save); item;
       item = strtok_r(NULL, ",", &save)) {
    if (P.ngroups == (int)(sizeof P.groups / sizeof P.groups[0])) usage("too many groups", text);
    P.groups[P.ngroups++] = (gid_t)number(item, 0xfffffffe);
  }
  free(copy);
}

static void parse(int argc, char **argv) {
  int i = 1;
  for (; i < argc; i++) {
    const char *opt = argv[i];
    if (!strcmp(opt, "--")) {
      i++;
      break;
    }
    if (!strcmp(opt, "--readonly-root")) {
      P.readonly_root = 1;
      continue;
    }
    if (!strcmp(opt, "--net-none")) {
      P.new_net = 1;
      continue;
    }
    if (i + 1 >= argc) usage("missing value for", opt);
    const char *val = argv[++i];
    if (!strcmp(opt, "--report-fd")) P.report_fd = (int)number(val, INT_MAX);
    else if (!strcmp(opt, "--lifeline-fd")) P.lifeline_fd = (int)number(val, INT_MAX);
    else if (!strcmp(opt, "--env-fd")) P.env_fd = (int)number(val, INT_MAX);
    else if (!strcmp(opt, "--uid")) P.uid = (uid_t)number(val, 0xfffffffe), P.set_user = 1;
    else if (!strcmp(opt, "--gid")) P.gid = (gid_t)number(val, 0xfffffffe);
    else if (!strcmp(opt, "--groups")) parse_groups(val);
    else if (!strcmp(opt, "--chdir")) P.chdir = val;
    else if (!strcmp(opt, "--cgroup")) add(P.cgroups, &P.ncgroups, val);
    else if (!strcmp(opt, "--tmpfs")) add(P.tmpfs, &P.ntmpfs, val);
    else if (!strcmp(opt, "--mqueue")) P.mqueue = val;
    else if (!strcmp(opt, "--hide")) add(P.hide, &P.nhide, val);
    else if (!strcmp(opt, "--bind")) add(P.bind, &P.nbind, val);
    else if (!strcmp(opt, "--cgroupfs")) add_cgroupfs(val);
    else usage("unknown option", opt);
  }
  if (P.report_fd < 0) usage("--report-fd is required", NULL);
  if (i >= argc) usage("no command after --", NULL);
  if (!P.chdir) usage("--chdir is required", NULL);
  P.argv = &argv[i];
}

/* The job's environment: NUL-terminated "NAME=value" strings, from a memfd. */
static void read_environment(void) {
  static char *empty[] = {NULL};
  P.envp = empty;
  if (P.env_fd < 0) return;
  struct stat st;
  if (fstat(P.env_fd, &st) < 0) fail("environment", errno, "fstat");
  size_t size = (size_t)st.st_size;
  char *block = malloc(size + 1);
  if (!block) fail("environment", ENOMEM, "");
  size_t got = 0;
  while (got < size) {
    ssize_t n = pread(P.env_fd, block + got, size - got, (off_t)got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("environment", n < 0 ? errno : EIO, "read");
    got += (size_t)n;
  }
  block[size] = '\0';
  size_t count = 0;
  for (size_t k = 0; k < size; k++) count += block[k] == '\0';
  char **envp = calloc(count + 1, sizeof *envp);
  if (!envp) fail("environment", ENOMEM, "");
  size_t n = 0;
  for (size_t k = 0; k < size && n < count; k += strlen(block + k) + 1) envp[n++] = block + k;
  P.envp = envp;
  close(P.env_fd);
  P.env_fd = -1;
}

/* ---- the init: the job's view of the filesystem ---------------------------------------- */

static void mount_or_fail(const char *source, const char *target, const char *type,
                          unsigned long flags, const char *data) {
  if (mount(source, target, type, flags, data) < 0) fail("mount", errno, target);
}

/* Per-mount attributes, changed without touching the others (MOUNT_ATTR_*, mount_setattr(2)). */
static void set_attributes(const char *path, uint64_t set, uint64_t clear, unsigned int flags) {
  struct mount_attr attr = {.attr_set = set, .attr_clr = clear};
  if (syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &attr, sizeof attr) < 0)
    fail("mount", errno, path);
}

/* mkdir -p, for a bind target that lives inside a fresh tmpfs. */
static void make_path(const char *path) {
  char buffer[PATH_MAX];
  if (strlen(path) >= sizeof buffer) fail("mount", ENAMETOOLONG, path);
  strcpy(buffer, path);
  for (char *slash = buffer + 1;; slash++) {
    if (*slash == '/' || *slash == '\0') {
      char saved = *slash;
      *slash = '\0';
      if (mkdir(buffer, 0755) < 0 && errno != EEXIST) fail("mount", errno, buffer);
      if (!saved) break;
      *slash = saved;
    }
  }
}

static void loopback_up(void) {
  int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) fail("network", errno, "socket");
  struct ifreq ifr = {0};
  strcpy(ifr.ifr_name, "lo");
  if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) fail("network", errno, "lo");
  ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
  if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) fail("network", errno, "lo");
  close(sock);
}

static void build_filesystem(void) {
  /* Bind sources are opened first: what they name may be covered by the steps below. */
  int bind_fds[MAX_ITEMS];
  for (int k = 0; k < P.nbind; k++) {
    bind_fds[k] = open(P.bind[k], O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (bind_fds[k] < 0) fail("mount", errno, P.bind[k]);
  }
  /* Private first: nothing done below may propagate back to the host. */
  mount_or_fail(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
  /* A /proc of the job's own PID namespace: it sees its own processes and nothing else. */
  mount_or_fail("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  for (int k = 0; k < P.ntmpfs; k++)
    mount_or_fail("tmpfs", P.tmpfs[k], "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  if (P.mqueue) mount_or_fail("mqueue", P.mqueue, "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  /* Covers stay writable until the binds below have made their mount points. */
  int covered[MAX_ITEMS];
  for (int k = 0; k < P.nhide; k++) {
    struct stat st;
    covered[k] = 0;
    if (lstat(P.hide[k], &st) < 0) {
      if (errno == ENOENT) continue; /* not there: nothing to hide (e.g. under a private /tmp) */
      fail("mount", errno, P.hide[k]);
    }
    if (S_ISDIR(st.st_mode)) {
      mount_or_fail("tmpfs", P.hide[k], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "mode=0755,size=64k,nr_inodes=256");
      covered[k] = 1;
    } else {
      mount_or_fail("/dev/null", P.hide[k], NULL, MS_BIND, NULL);
      set_attributes(P.hide[k],
                     MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                     0, 0);
    }
  }
  for (int k = 0; k < P.nbind; k++) {
    char source[64];
    snprintf(source, sizeof source, "/proc/self/fd/%d", bind_fds[k]);
    make_path(P.bind[k]);
    mount_or_fail(source, P.bind[k], NULL, MS_BIND, NULL);
    /* Never a way to setuid programs or devices; everything else as the source mount has it. */
    set_attributes(P.bind[k], MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0);
    close(bind_fds[k]);
  }
  for (int k = 0; k < P.nhide; k++)
    if (covered[k])
      mount_or_fail(NULL, P.hide[k], NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    NULL);
}

/* ---- the job --------------------------------------------------------------------------- */

static void enter_cgroups(void) {
  for (int k = 0; k < P.ncgroups; k++) {
    int fd = open(P.cgroups[k], O_WRONLY | O_CLOEXEC);
    /* "0" is the writer itself, whatever its PID in whichever namespace. */
    if (fd < 0 || write(fd, "0", 1) != 1) fail("cgroup", errno, P.cgroups[k]);
    close(fd);
  }
}

static void drop_privileges(void) {
  if (!P.set_user) return;
  /* The bounding set first, while we may still change it: no exec can bring a capability back. */
  int last = CAP_LAST_CAP;
  FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
  if (f) {
    if (fscanf(f, "%d", &last) != 1) last = CAP_LAST_CAP;
    fclose(f);
  }
  for (int cap = 0; cap <= last; cap++)
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
      fail("identity", errno, "capability bounding set");
  if (setgroups((size_t)P.ngroups, P.groups) < 0) fail("identity", errno, "setgroups");
  if (setresgid(P.gid, P.gid, P.gid) < 0) fail("identity", errno, "setresgid");
  if (setresuid(P.uid, P.uid, P.uid) < 0) fail("identity", errno, "setresuid");
  /* setresuid away from 0 empties the permitted and effective sets; inheritable and ambient
     survive it, so clear them explicitly. */
  struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
  struct __user_cap_data_struct data[2] = {{0}};
  if (syscall(SYS_capset, &header, data) < 0) fail("identity", errno, "capset");
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
    fail("identity", errno, "ambient capabilities");
  if (setuid(0) == 0) fail("identity", EPERM, "still able to become root");
}

/* The job's own view of the cgroup filesystems, from inside its cgroup namespace, read-only. */
static void mount_cgroupfs(void) {
  for (int k = 0; k < P.ncgroupfs; k++) {
    char type[32], options[256];
    const char *spec = P.cgroupfs[k], *first = strchr(spec, ':'), *second = strchr(first + 1, ':');
    snprintf(type, sizeof type, "%.*s", (int)(first - spec), spec);
    snprintf(options, sizeof options, "%.*s", (int)(second - first - 1), first + 1);
    /* The kernel refuses a filesystem mounted on itself (EBUSY): the old mount goes first. */
    if (umount2(second + 1, MNT_DETACH) < 0) fail("mount", errno, second + 1);
    mount_or_fail(type, second + 1, type, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  options[0] ? options : NULL);
  }
}

/* Read-only comes last, after the job entered its cgroups: a mount cannot turn read-only while
   a file on it is open for writing, and cgroup.procs must be written before. */
static void make_readonly(void) {
  if (P.readonly_root) {
    set_attributes("/", MOUNT_ATTR_RDONLY, 0, AT_RECURSIVE);
    /* What the job may write stays writable: its own tmpfs, its working directory, /proc. */
    set_attributes("/proc", 0, MOUNT_ATTR_RDONLY, 0);
    for (int k = 0; k < P.ntmpfs; k++) set_attributes(P.tmpfs[k], 0, MOUNT_ATTR_RDONLY, 0);
    if (P.mqueue) set_attributes(P.mqueue, 0, MOUNT_ATTR_RDONLY, 0);
    for (int k = 0; k < P.nbind; k++) set_attributes(P.bind[k], 0, MOUNT_ATTR_RDONLY, 0);
  }
}

/* The job's own PATH, searched as Python's subprocess does (and unlike execvp, which runs a
   file without a #! line through /bin/sh): every candidate is tried with execve, and the error
   reported is the first one that is not "no such file", so "not executable" or "exec format
   error" is not hidden behind a later miss. */
static _Noreturn void exec_command(void) {
  const char *file = P.argv[0];
  if (strchr(file, '/')) {
    execve(file, P.argv, P.envp);
    fail("exec", errno, file);
  }
  const char *path = "/bin:/usr/bin"; /* os.defpath, for a job without PATH */
  for (char **e = P.envp; *e; e++)
    if (!strncmp(*e, "PATH=", 5)) path = *e + 5;
  int first_error = 0;
  char candidate[PATH_MAX];
  for (const char *dir = path;; dir = strchr(dir, ':') + 1) {
    size_t length = strcspn(dir, ":");
    /* An empty entry is the working directory, as in every shell. */
    int n = length ? snprintf(candidate, sizeof candidate, "%.*s/%s", (int)length, dir, file)
                   : snprintf(candidate, sizeof candidate, "%s", file);
    if (n > 0 && n < (int)sizeof candidate) {
      execve(candidate, P.argv, P.envp);
      if (errno != ENOENT && errno != ENOTDIR && !first_error) first_error = errno;
    }
    if (!dir[length]) break;
  }
  fail("exec", first_error ? first_error : ENOENT, file);
}

static _Noreturn void run_job(int status_w) {
  /* The job leads its own session, with default signal handling and nothing blocked. */
  setsid();
  for (int sig = 1; sig < _NSIG; sig++) signal(sig, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  close(status_w);
  enter_cgroups();
  if (P.ncgroups && unshare(CLONE_NEWCGROUP) < 0) fail("unshare", errno, "cgroup namespace");
  mount_cgroupfs();
  make_readonly();
  drop_privileges();
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail("identity", errno, "no_new_privs");
  /* As the job's user: a directory it may not enter is an error, not a root privilege. */
  if (chdir(P.chdir) < 0) fail("chdir", errno, P.chdir);
  /* Nothing of ours leaks into the job; the report fd closes itself on a successful exec. */
  if (P.report_fd > 3) syscall(SYS_close_range, 3, P.report_fd - 1, 0);
  syscall(SYS_close_range, P.report_fd + 1, ~0U, 0);
  if (fcntl(P.report_fd, F_SETFD, FD_CLOEXEC) < 0) fail("exec", errno, "report fd");
  exec_command();
}

/* ---- the init -------------------------------------------------------------------------- */

struct status_message {
  char kind; /* 'F': the job was forked; 'S': it ended, with `status` */
  int status;
};

static void send_status(int fd, char kind, int status) {
  struct status_message m = {.kind = kind, .status = status};
  while (write(fd, &m, sizeof m) < 0 && errno == EINTR) {
  }
}

/* The job can read /proc/1/cmdline: it shows the plan (which paths are hidden, and where),
   which is none of its business. Our copy of the plan is not needed after the fork. */
static char *args_start, *args_end;

static void forget_command_line(void) {
  if (args_start && args_end > args_start) memset(args_start, 0, (size_t)(args_end - args_start));
}

static _Noreturn void run_init(int status_w) {
  /* Our parent is the keeper, single-threaded: its death is ours, and so the whole namespace's. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (P.lifeline_fd >= 0) close(P.lifeline_fd);
  int flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (P.new_net ? CLONE_NEWNET : 0);
  if (unshare(flags) < 0) fail("unshare", errno, "mount, IPC, UTS or network namespace");
  if (P.new_net) loopback_up();
  build_filesystem();
  pid_t job = fork();
  if (job < 0) fail("fork", errno, "job");
  if (job == 0) run_job(status_w);
  forget_command_line();
  close(P.report_fd);
  int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull >= 0) {
    /* The job's output pipes must close when the job's processes are gone, not when we are. */
    dup2(devnull, 0), dup2(devnull, 1), dup2(devnull, 2);
    close(devnull);
  }
  send_status(status_w, 'F', 0);
  /* PID 1's one duty: reap. As init of its namespace, signals it has no handler for never reach
     it, so the job cannot kill it; the keeper can, with SIGKILL. */
  for (;;) {
    int status;
    pid_t pid = waitpid(-1, &status, 0);
    if (pid == job) {
      send_status(status_w, 'S', status);
      _exit(0); /* the kernel now kills everything the job left in the namespace */
    }
    if (pid < 0 && errno != EINTR) _exit(0);
  }
}

/* ---- the keeper ------------------------------------------------------------------------ */

static pid_t first_child(pid_t parent) {
  char path[64], text[64] = {0};
  snprintf(path, sizeof path, "/proc/%d/task/%d/children", parent, parent);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, text, sizeof text - 1);
  close(fd);
  return n > 0 ? (pid_t)atoi(text) : 0;
}

static _Noreturn void relay(int status) {
  if (WIFEXITED(status)) _exit(WEXITSTATUS(status));
  int sig = WIFSIGNALED(status) ? WTERMSIG(status) : SIGKILL;
  /* Die of the same signal, without a core file of our own. */
  struct rlimit none = {0, 0};
  setrlimit(RLIMIT_CORE, &none);
  signal(sig, SIG_DFL);
  sigset_t only;
  sigemptyset(&only);
  sigaddset(&only, sig);
  sigprocmask(SIG_UNBLOCK, &only, NULL);
  raise(sig);
  _exit(128 + sig);
}

int main(int argc, char **argv) {
  if (argc == 2 && !strcmp(argv[1], "--source-sha256")) {
    puts(SOURCE_SHA256);
    return 0;
  }
  /* argv strings are contiguous: everything after the program's name is the plan. */
  args_start = argv[0] + strlen(argv[0]) + 1;
  args_end = argv[argc - 1] + strlen(argv[argc - 1]) + 1;
  parse(argc, argv);
  read_environment();
  /* Requests to end the job arrive as signals; they are read from a signalfd, never handled
     asynchronously, and the job resets them before it execs. */
  sigset_t requests;
  sigemptyset(&requests);
  sigaddset(&requests, SIGTERM);
  sigaddset(&requests, SIGINT);
  sigaddset(&requests, SIGHUP);
  sigprocmask(SIG_BLOCK, &requests, NULL);
  int status_pipe[2];
  if (pipe2(status_pipe, O_CLOEXEC) < 0) fail("pipe", errno, "");
  if (unshare(CLONE_NEWPID) < 0) fail("unshare", errno, "PID namespace");
  pid_t init = fork();
  if (init < 0) fail("fork", errno, "init");
  if (init == 0) {
    close(status_pipe[0]);
    run_init(status_pipe[1]);
  }
  close(status_pipe[1]);
  int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull >= 0) {
    dup2(devnull, 0), dup2(devnull, 1), dup2(devnull, 2);
    close(devnull);
  }
  int signals = signalfd(-1, &requests, SFD_CLOEXEC);
  struct pollfd fds[3] = {
      {.fd = status_pipe[0], .events = POLLIN},
      {.fd = P.lifeline_fd, .events = POLLIN},
      {.fd = signals, .events = POLLIN},
  };
  int have_status = 0, job_status = 0, killed = 0;
  size_t got = 0;
  struct status_message message;
  for (;;) {
    if (poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[0].revents) {
      ssize_t n = read(status_pipe[0], (char *)&message + got, sizeof message - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break; /* the init is gone */
      got += (size_t)n;
      if (got < sizeof message) continue;
      got = 0;
      if (message.kind == 'F') {
        report("pids %d %d", init, first_child(init));
        close(P.report_fd);
      } else if (message.kind == 'S') {
        have_status = 1;
        job_status = message.status;
      }
    }
    if ((fds[1].revents || fds[2].revents) && !killed) {
      /* Asked to end the job, or the supervisor is gone: end the whole namespace at once. */
      kill(init, SIGKILL);
      killed = 1;
    }
    if (fds[1].revents) fds[1].fd = -1;
    if (fds[2].revents) {
      struct signalfd_siginfo info;
      if (read(signals, &info, sizeof info) < 0 && errno != EAGAIN) fds[2].fd = -1;
    }
  }
  int init_status;
  while (waitpid(init, &init_status, 0) < 0)
    if (errno != EINTR) _exit(127);
  if (have_status) relay(job_status);
  /* No status: the init failed before the job ran (it reported why), or it was killed, and the
     job's whole namespace with it. */
  if (WIFEXITED(init_status)) _exit(WEXITSTATUS(init_status));
  relay(init_status);
}
