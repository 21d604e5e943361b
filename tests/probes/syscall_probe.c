/*
 * Try each operation named on the command line and print one line per name.
 * The line is "NAME OK" when the syscall succeeded and "NAME errno=N" when it failed with
 * errno N, or "NAME signal=N" when the probe's child was killed by signal N. A kexec probe
 * that would use up a kexec load limit prints "NAME skipped", and a name this program does
 * not know prints "NAME unknown".
 *
 * Every probe passes arguments that the kernel rejects (a missing path, an invalid flag, a bad
 * fd), or does something that only touches this process and its children. Run as root without
 * a seccomp filter, no probe changes the host. None fails with EPERM then, unless a sysctl
 * restricts root too (kernel.modules_disabled=1, kernel.kexec_load_disabled=1 or
 * kernel.io_uring_disabled=2), so an EPERM under the filter comes from the filter.
 *
 * Build: gcc -static -O2 -o syscall_probe syscall_probe.c
 * Exit status: 0, or 2 for a usage error or an unknown name.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/quota.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef MAXQUOTAS
#define MAXQUOTAS 3
#endif

/* Outcome codes besides 0 (success) and a positive errno. A negative value is -signal. */
#define OUTCOME_SKIPPED INT_MIN

/* socket() checks the type against SOCK_MAX (11) before it looks up the address family. */
#define INVALID_SOCKET_TYPE 15
/* No swapon flag uses this bit, so the kernel returns EINVAL before it opens the path. */
#define INVALID_SWAP_FLAG 0x40000000
/* kexec_load: an architecture field (bits 16-31) that no machine uses and an unknown low
 * flag bit. Either makes the call fail with EINVAL. Valid flags with zero segments would
 * unload the loaded kexec image. */
#define INVALID_KEXEC_FLAGS 0xffff8000UL
/* kexec_file_load: no flag uses this bit, and KEXEC_FILE_UNLOAD (bit 0) stays clear. */
#define INVALID_KEXEC_FILE_FLAGS (1UL << 62)
/* The i386 number of getpid, called through int 0x80. */
#define I386_NR_GETPID 20
#define X32_SYSCALL_BIT 0x40000000

static char temp_dir[] = "/tmp/syscall-probe-XXXXXX";
/* A path inside temp_dir that is never created. */
static char missing_path[sizeof temp_dir + 16];

static int outcome(long result)
{
    return result < 0 ? errno : 0;
}

static int outcome_fd(long fd)
{
    if (fd < 0)
        return errno;
    close((int)fd);
    return 0;
}

/* Wait for a probe child that exits with 0 or an errno. */
static int wait_child(pid_t pid)
{
    int status;

    if (pid < 0)
        return errno;
    while (waitpid(pid, &status, __WALL) < 0) {
        if (errno != EINTR)
            return errno;
    }
    if (WIFSIGNALED(status))
        return -WTERMSIG(status);
    return WEXITSTATUS(status);
}

/* Return whether this process runs under a seccomp filter (Seccomp: 2 in /proc/self/status). */
static int under_seccomp_filter(void)
{
    char line[256];
    int mode = 0;
    FILE *status = fopen("/proc/self/status", "r");

    if (status == NULL)
        return 0;
    while (fgets(line, sizeof line, status) != NULL) {
        if (sscanf(line, "Seccomp: %d", &mode) == 1)
            break;
    }
    fclose(status);
    return mode == 2;
}

/*
 * Each permitted kexec call uses one of kernel.kexec_load_limit_reboot when that limit is set
 * (it is -1, unlimited, by default). Skip the call then, unless a filter stops it first.
 */
static int kexec_limit_is_set(void)
{
    char value[32] = "";
    FILE *limit = fopen("/proc/sys/kernel/kexec_load_limit_reboot", "r");

    if (limit == NULL)
        return 0;
    if (fgets(value, sizeof value, limit) == NULL)
        value[0] = '\0';
    fclose(limit);
    return strtol(value, NULL, 10) != -1;
}

static int probe_mount(void)
{
    /* Binding a path that does not exist fails with ENOENT. */
    return outcome(mount(missing_path, temp_dir, NULL, MS_BIND, NULL));
}

static int probe_umount2(void)
{
    /* temp_dir is not a mount point, so this fails with EINVAL. */
    return outcome(umount2(temp_dir, 0));
}

static int probe_pivot_root(void)
{
    return outcome(syscall(SYS_pivot_root, missing_path, missing_path));
}

static int probe_open_tree(void)
{
    return outcome_fd(syscall(SYS_open_tree, AT_FDCWD, missing_path, OPEN_TREE_CLOEXEC));
}

static int probe_move_mount(void)
{
    return outcome(syscall(SYS_move_mount, AT_FDCWD, missing_path, AT_FDCWD, temp_dir, 0));
}

static int probe_fsopen(void)
{
    /* An unconfigured filesystem context only lives as long as its fd. */
    return outcome_fd(syscall(SYS_fsopen, "tmpfs", FSOPEN_CLOEXEC));
}

static int probe_fsconfig(void)
{
    return outcome(syscall(SYS_fsconfig, -1, FSCONFIG_SET_FLAG, "ro", NULL, 0));
}

static int probe_fsmount(void)
{
    return outcome_fd(syscall(SYS_fsmount, -1, 0, 0));
}

static int probe_fspick(void)
{
    return outcome_fd(syscall(SYS_fspick, AT_FDCWD, missing_path, 0));
}

static int probe_mount_setattr(void)
{
    /* A size of 0 is below MOUNT_ATTR_SIZE_VER0, so this fails with EINVAL. */
    return outcome(syscall(SYS_mount_setattr, AT_FDCWD, missing_path, 0, NULL, 0));
}

static int probe_unshare(void)
{
    /* In a child, so that this process keeps its namespaces. */
    pid_t pid = fork();

    if (pid == 0)
        _exit(outcome(unshare(CLONE_NEWUTS)));
    return wait_child(pid);
}

static int probe_setns(void)
{
    /* Joining the UTS namespace this process is already in changes nothing. */
    int fd = open("/proc/self/ns/uts", O_RDONLY | O_CLOEXEC);
    int result = outcome(setns(fd, CLONE_NEWUTS));

    if (fd >= 0)
        close(fd);
    return result;
}

static int probe_bpf(void)
{
    /* A program of zero instructions is rejected (E2BIG). */
    union bpf_attr attr;

    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    return outcome_fd(syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr));
}

static int probe_perf_event_open(void)
{
    /* An attr size below PERF_ATTR_SIZE_VER0 fails with E2BIG before any access check. */
    struct perf_event_attr attr;

    memset(&attr, 0, sizeof attr);
    attr.size = 1;
    return outcome_fd(syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));
}

static int probe_init_module(void)
{
    /* An empty image is not an ELF module (ENOEXEC). */
    return outcome(syscall(SYS_init_module, NULL, 0UL, ""));
}

static int probe_finit_module(void)
{
    return outcome(syscall(SYS_finit_module, -1, "", 0));
}

static int probe_delete_module(void)
{
    return outcome(syscall(SYS_delete_module, "syscall_probe_no_such_module", O_NONBLOCK));
}

static int probe_kexec_load(void)
{
    if (kexec_limit_is_set() && !under_seccomp_filter())
        return OUTCOME_SKIPPED;
    return outcome(syscall(SYS_kexec_load, 0UL, 0UL, NULL, INVALID_KEXEC_FLAGS));
}

static int probe_kexec_file_load(void)
{
    if (kexec_limit_is_set() && !under_seccomp_filter())
        return OUTCOME_SKIPPED;
    return outcome(syscall(SYS_kexec_file_load, -1, -1, 0UL, NULL, INVALID_KEXEC_FILE_FLAGS));
}

static int probe_reboot(void)
{
    /* The kernel acts only on its two magic numbers, so zeros fail with EINVAL. */
    return outcome(syscall(SYS_reboot, 0, 0, 0, NULL));
}

static int probe_swapon(void)
{
    return outcome(syscall(SYS_swapon, missing_path, INVALID_SWAP_FLAG));
}

static int probe_swapoff(void)
{
    return outcome(syscall(SYS_swapoff, missing_path));
}

static int probe_acct(void)
{
    /* acct() opens the new file before it stops the current accounting, so ENOENT. */
    return outcome(syscall(SYS_acct, missing_path));
}

static int probe_quotactl(void)
{
    /* Quota type MAXQUOTAS is one past the last type (EINVAL). */
    return outcome(syscall(SYS_quotactl, QCMD(Q_GETFMT, MAXQUOTAS), temp_dir, 0, NULL));
}

static int probe_add_key(void)
{
    /* An empty key type is invalid (EINVAL). */
    return outcome(syscall(SYS_add_key, "", "syscall-probe", NULL, 0UL, KEY_SPEC_THREAD_KEYRING));
}

static int probe_request_key(void)
{
    return outcome(syscall(SYS_request_key, "", "syscall-probe", NULL, 0));
}

static int probe_keyctl(void)
{
    /* With create = 0 this only looks up the thread keyring, and there is none (ENOKEY). */
    return outcome(syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_THREAD_KEYRING, 0));
}

static int probe_io_uring_setup(void)
{
    return outcome_fd(syscall(SYS_io_uring_setup, 0, NULL));
}

static int probe_io_uring_enter(void)
{
    return outcome(syscall(SYS_io_uring_enter, -1, 0, 0, 0, NULL, 0));
}

static int probe_io_uring_register(void)
{
    return outcome(syscall(SYS_io_uring_register, -1, 0, NULL, 0));
}

static int probe_ptrace(void)
{
    /* The child makes this process its tracer (PTRACE_TRACEME), then exits. */
    pid_t pid = fork();

    if (pid == 0)
        _exit(outcome(ptrace(PTRACE_TRACEME, 0, NULL, NULL)));
    return wait_child(pid);
}

static char vm_source[] = "probe";

static int probe_process_vm_readv(void)
{
    /* Reads this process's own memory. */
    char copy[sizeof vm_source];
    struct iovec local = {copy, sizeof copy};
    struct iovec remote = {vm_source, sizeof vm_source};

    return outcome(syscall(SYS_process_vm_readv, getpid(), &local, 1UL, &remote, 1UL, 0UL));
}

static int probe_process_vm_writev(void)
{
    /* Writes this process's own memory with the bytes it already has. */
    char copy[sizeof vm_source];
    struct iovec local = {copy, sizeof copy};
    struct iovec remote = {vm_source, sizeof vm_source};

    memcpy(copy, vm_source, sizeof copy);
    return outcome(syscall(SYS_process_vm_writev, getpid(), &local, 1UL, &remote, 1UL, 0UL));
}

static int probe_open_by_handle_at(void)
{
    /* A handle of zero bytes is invalid (EINVAL). */
    struct file_handle handle;

    memset(&handle, 0, sizeof handle);
    return outcome_fd(syscall(SYS_open_by_handle_at, AT_FDCWD, &handle, O_RDONLY));
}

static int probe_userfaultfd(void)
{
    return outcome_fd(syscall(SYS_userfaultfd, O_CLOEXEC));
}

static int probe_clone_newuser(void)
{
    /* The raw syscall, because glibc's fork() never passes namespace flags. */
    long pid = syscall(SYS_clone, (unsigned long)(CLONE_NEWUSER | SIGCHLD), NULL, NULL, NULL, 0UL);

    if (pid == 0)
        _exit(0);
    return wait_child((pid_t)pid);
}

static int probe_fork(void)
{
    pid_t pid = fork();

    if (pid == 0)
        _exit(0);
    return wait_child(pid);
}

static void *return_argument(void *argument)
{
    return argument;
}

static int probe_thread(void)
{
    /* glibc 2.34 and later create threads with clone3 and fall back to clone on ENOSYS. */
    pthread_t thread;
    int error = pthread_create(&thread, NULL, return_argument, NULL);

    if (error != 0)
        return error;
    return pthread_join(thread, NULL);
}

static int probe_clone3(void)
{
    /* A size below CLONE_ARGS_SIZE_VER0 fails with EINVAL, so no child is created. */
    return outcome(syscall(SYS_clone3, NULL, 0UL));
}

static int probe_socket_vsock(void)
{
    /* The invalid type fails with EINVAL before the kernel looks up or loads AF_VSOCK. */
    return outcome_fd(socket(AF_VSOCK, INVALID_SOCKET_TYPE, 0));
}

static int probe_socket_unix(void)
{
    return outcome_fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
}

#ifdef __x86_64__
static int probe_i386_getpid(void)
{
    /* In a child, because a kernel without IA32 emulation may send a signal for int 0x80. */
    pid_t pid = fork();

    if (pid == 0) {
        long result = I386_NR_GETPID;

        __asm__ volatile("int $0x80"
                         : "+a"(result)
                         :
                         : "r8", "r9", "r10", "r11", "memory", "cc");
        _exit(result < 0 ? (int)-result : 0);
    }
    return wait_child(pid);
}

static int probe_x32_getpid(void)
{
    /* ENOSYS where the kernel runs without x32 support. */
    return outcome(syscall(SYS_getpid | X32_SYSCALL_BIT));
}
#endif

struct probe {
    const char *name;
    int (*run)(void);
};

static const struct probe probes[] = {
    {"mount", probe_mount},
    {"umount2", probe_umount2},
    {"pivot_root", probe_pivot_root},
    {"open_tree", probe_open_tree},
    {"move_mount", probe_move_mount},
    {"fsopen", probe_fsopen},
    {"fsconfig", probe_fsconfig},
    {"fsmount", probe_fsmount},
    {"fspick", probe_fspick},
    {"mount_setattr", probe_mount_setattr},
    {"unshare", probe_unshare},
    {"setns", probe_setns},
    {"bpf", probe_bpf},
    {"perf_event_open", probe_perf_event_open},
    {"init_module", probe_init_module},
    {"finit_module", probe_finit_module},
    {"delete_module", probe_delete_module},
    {"kexec_load", probe_kexec_load},
    {"kexec_file_load", probe_kexec_file_load},
    {"reboot", probe_reboot},
    {"swapon", probe_swapon},
    {"swapoff", probe_swapoff},
    {"acct", probe_acct},
    {"quotactl", probe_quotactl},
    {"add_key", probe_add_key},
    {"request_key", probe_request_key},
    {"keyctl", probe_keyctl},
    {"io_uring_setup", probe_io_uring_setup},
    {"io_uring_enter", probe_io_uring_enter},
    {"io_uring_register", probe_io_uring_register},
    {"ptrace", probe_ptrace},
    {"process_vm_readv", probe_process_vm_readv},
    {"process_vm_writev", probe_process_vm_writev},
    {"open_by_handle_at", probe_open_by_handle_at},
    {"userfaultfd", probe_userfaultfd},
    {"clone_newuser", probe_clone_newuser},
    {"fork", probe_fork},
    {"thread", probe_thread},
    {"clone3", probe_clone3},
    {"socket_vsock", probe_socket_vsock},
    {"socket_unix", probe_socket_unix},
#ifdef __x86_64__
    {"i386_getpid", probe_i386_getpid},
    {"x32_getpid", probe_x32_getpid},
#endif
};

static const struct probe *find_probe(const char *name)
{
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        if (strcmp(probes[i].name, name) == 0)
            return &probes[i];
    }
    return NULL;
}

static void print_outcome(const char *name, int result)
{
    if (result == 0)
        printf("%s OK\n", name);
    else if (result == OUTCOME_SKIPPED)
        printf("%s skipped\n", name);
    else if (result < 0)
        printf("%s signal=%d\n", name, -result);
    else
        printf("%s errno=%d\n", name, result);
}

int main(int argc, char **argv)
{
    int status = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s NAME...\n", argv[0]);
        return 2;
    }
    if (mkdtemp(temp_dir) == NULL) {
        perror("syscall_probe: creating a folder in /tmp failed");
        return 1;
    }
    snprintf(missing_path, sizeof missing_path, "%s/missing", temp_dir);

    for (int i = 1; i < argc; i++) {
        const struct probe *probe = find_probe(argv[i]);

        if (probe == NULL) {
            printf("%s unknown\n", argv[i]);
            status = 2;
            continue;
        }
        print_outcome(probe->name, probe->run());
        /* Keep the lines printed so far if a later probe kills this process. */
        fflush(stdout);
    }

    rmdir(temp_dir);
    return status;
}
